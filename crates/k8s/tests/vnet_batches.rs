//! VNet mode in Kubernetes through the real kube client against a scripted API server: the
//! agent learns its batches from the FerrumIPPool and its FerrumNode (as the NodeNetworkConfig
//! the lab's cloud writes), and its requests claim more batches (a 409 Conflict is retried
//! with a fresh resourceVersion) and release whole ones. The agent's side is played by the
//! same IPAM pool and batch scaler the agent runs (ferrum_ipam), fed by what the source emits.

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrum_ipam::{Pool, Scaler};
use ferrum_k8s::KubeSource;
use ferrum_k8s::vnet::VnetOptions;
use ferrum_model::{NncSpec, NodeNetworkConfig, Object, Source, WatchEvent};
use support::{MockApi, Reply, list, status};

const POOLS: &str = "/apis/ferrum.dev/v1alpha1/ferrumippools";
const POOL: &str = "/apis/ferrum.dev/v1alpha1/ferrumippools/default";
const NODES: &str = "/apis/ferrum.dev/v1alpha1/ferrumnodes";
const NODE_A: &str = "/apis/ferrum.dev/v1alpha1/ferrumnodes/a";

/// The pool 10.241.0.0/26: four /28 batches (.0 and .48 have 15 usable addresses).
fn pool(rv: &str, allocations: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumIPPool",
        "metadata": {"name": "default", "resourceVersion": rv},
        "spec": {"cidr": "10.241.0.0/26", "batchPrefixLength": 28, "allocations": allocations}
    })
}

fn fnode(rv: &str, requested: u32, cidrs: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumNode",
        "metadata": {"name": "a", "resourceVersion": rv},
        "spec": {"podCIDRs": cidrs, "requestedIPCount": requested},
        "status": {"ready": true, "realizedRevision": 4}
    })
}

const POD_SUBNET: &str = "10.241.0.0/16";

/// Node a's watch source in VNet mode against the mock API server (POD_SUBNET, 110 pods).
fn start_node_a(api: &MockApi) -> KubeSource {
    let mock = api.clone();
    let options = VnetOptions {
        pod_subnet: POD_SUBNET.parse().unwrap(),
        max_pods: 110,
    };
    KubeSource::start_with(Arc::new(move || Ok(mock.client())), "a", Some(options)).unwrap()
}

/// Reads events until this node's NodeNetworkConfig comes with a status for which `done`
/// holds, and the Synced closing its batch.
fn next_own_nnc(
    src: &mut KubeSource,
    done: impl Fn(&NodeNetworkConfig) -> bool,
) -> NodeNetworkConfig {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found: Option<NodeNetworkConfig> = None;
    loop {
        assert!(Instant::now() < deadline, "timed out; last: {found:?}");
        match src.next_event_timeout(Duration::from_millis(200)).unwrap() {
            Some(WatchEvent::Upsert {
                object: Object::NodeNetworkConfig(n),
            }) if n.node() == "a" && done(&n) => found = Some(n),
            Some(WatchEvent::Synced { .. }) if found.is_some() => return found.unwrap(),
            _ => {}
        }
    }
}

fn puts(api: &MockApi, path: &str) -> Vec<serde_json::Value> {
    api.seen()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.path == path)
        .map(|s| serde_json::from_str(&s.body).unwrap())
        .collect()
}

/// The agent's VNet step (crates/agent handler.rs vnet_request): the scaler's target from
/// the pool's use, surplus marked as releasing in whole batches, the request to send.
fn agent_request(pool: &mut Pool<u32, ()>, scaler: Scaler, batch_len: u8) -> NncSpec {
    let held = pool.capacity_unbounded();
    let target = scaler.target(pool.used(), held);
    if target < held {
        pool.mark_releasing_batches((held - target) as usize, batch_len);
    }
    NncSpec {
        requested_ip_count: target,
        ips_not_in_use: pool.releasing().iter().copied().collect(),
    }
}

fn take_status(pool: &mut Pool<u32, ()>, nnc: &NodeNetworkConfig) -> Scaler {
    let status = nnc.status.as_ref().unwrap();
    pool.set_addresses(status.assigned_ips.iter().copied().collect())
        .unwrap();
    let s = status.scaler;
    Scaler {
        batch_size: s.batch_size,
        request_threshold_percent: s.request_threshold_percent,
        release_threshold_percent: s.release_threshold_percent,
        max_ip_count: s.max_ip_count,
    }
}

#[test]
fn the_agent_takes_claims_and_releases_batches_through_the_api_server() {
    let api = MockApi::default();
    let grown = Arc::new(AtomicBool::new(false));
    // The listing: a owns .16/28 and asked for 16; b owns .0 and .32.
    api.on(
        "GET",
        POOLS,
        false,
        Reply::Json(
            200,
            list(
                &[pool(
                    "10",
                    serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28", "10.241.0.32/28"]}),
                )],
                "10",
            ),
        ),
    )
    .on(
        "GET",
        NODES,
        false,
        Reply::Json(200, list(&[fnode("3", 16, &["10.241.0.16/28"])], "3")),
    );
    // Growing: the FerrumNode's request is recorded first (a status write races it: 409,
    // re-read, retry), then the pool: our write with resourceVersion 10 loses to b giving
    // back .32 and c taking .48 (409); re-read at 11, a takes .32.
    api.on("GET", NODE_A, false, Reply::Json(200, fnode("3", 16, &["10.241.0.16/28"])))
        .on("PUT", NODE_A, false, Reply::Json(409, status(409, "Conflict", "the object has been modified")))
        .on("GET", NODE_A, false, Reply::Json(200, fnode("4", 16, &["10.241.0.16/28"])))
        .on("PUT", NODE_A, false, Reply::Echo(200))
        .on("GET", POOL, false, Reply::Json(200, pool("10", serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28", "10.241.0.32/28"]}))))
        .on("PUT", POOL, false, Reply::Json(409, status(409, "Conflict", "the object has been modified")))
        .on("GET", POOL, false, Reply::Json(200, pool("11", serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28"], "c": ["10.241.0.48/28"]}))))
        .on("PUT", POOL, false, Reply::Echo(200))
        .on("GET", NODE_A, false, Reply::Json(200, fnode("5", 32, &["10.241.0.16/28"])))
        .on("PUT", NODE_A, false, Reply::Echo(200));
    // The pool as the watch then shows it.
    let grown_pool = pool(
        "12",
        serde_json::json!({"a": ["10.241.0.16/28", "10.241.0.32/28"], "b": ["10.241.0.0/28"], "c": ["10.241.0.48/28"]}),
    );
    api.on(
        "GET",
        POOLS,
        true,
        Reply::WatchWhen(
            grown.clone(),
            vec![serde_json::json!({"type": "MODIFIED", "object": grown_pool.clone()})],
        ),
    );
    // Shrinking: the request (16) recorded, the pool without .32, the FerrumNode mirrors it.
    api.on(
        "GET",
        NODE_A,
        false,
        Reply::Json(200, fnode("6", 32, &["10.241.0.16/28", "10.241.0.32/28"])),
    )
    .on("PUT", NODE_A, false, Reply::Echo(200))
    .on("GET", POOL, false, Reply::Json(200, grown_pool))
    .on("PUT", POOL, false, Reply::Echo(200))
    .on(
        "GET",
        NODE_A,
        false,
        Reply::Json(200, fnode("7", 16, &["10.241.0.16/28", "10.241.0.32/28"])),
    )
    .on("PUT", NODE_A, false, Reply::Echo(200));
    let mut src = start_node_a(&api);
    let mut requester = src
        .ip_requester()
        .expect("VNet mode takes address requests");

    // 1. Initial batches: the listing becomes a's NodeNetworkConfig with its 16 addresses and
    //    the pool's batch policy.
    let nnc = next_own_nnc(&mut src, |n| n.status.is_some());
    assert_eq!(nnc.spec.requested_ip_count, 16);
    let mut ipam: Pool<u32, ()> = Pool::with_subnet(POD_SUBNET.parse().unwrap(), 110);
    let scaler = take_status(&mut ipam, &nnc);
    assert_eq!(
        (scaler.batch_size, scaler.min_free(), scaler.max_free()),
        (16, 8, 24)
    );
    assert_eq!(ipam.capacity_unbounded(), 16);
    assert_eq!(nnc.status.as_ref().unwrap().batch_prefix_length, Some(28));
    assert_eq!(
        agent_request(&mut ipam, scaler, 28).requested_ip_count,
        16,
        "nothing to ask for yet"
    );

    // 2. Nine pods: 7 free, under the threshold: the agent asks for 32.
    for pod in 0..9 {
        ipam.allocate(pod, ()).unwrap();
    }
    let request = agent_request(&mut ipam, scaler, 28);
    assert_eq!(request.requested_ip_count, 32);
    requester.request_ips("a", &request).unwrap();
    let pool_puts = puts(&api, POOL);
    assert_eq!(pool_puts.len(), 2, "one lost race, one win");
    assert_eq!(pool_puts[0]["metadata"]["resourceVersion"], "10");
    assert_eq!(
        pool_puts[0]["spec"]["allocations"]["a"],
        serde_json::json!(["10.241.0.16/28", "10.241.0.48/28"])
    );
    assert_eq!(
        pool_puts[1]["metadata"]["resourceVersion"], "11",
        "fresh resourceVersion"
    );
    assert_eq!(
        pool_puts[1]["spec"]["allocations"]["a"],
        serde_json::json!(["10.241.0.16/28", "10.241.0.32/28"])
    );
    assert_eq!(
        pool_puts[1]["spec"]["allocations"]["c"][0], "10.241.0.48/28",
        "c's claim kept"
    );
    let node_puts = puts(&api, NODE_A);
    assert_eq!(
        node_puts.len(),
        3,
        "request (lost to a status write, retried), batches"
    );
    assert_eq!(node_puts[1]["metadata"]["resourceVersion"], "4");
    assert_eq!(node_puts[1]["spec"]["requestedIPCount"], 32);
    assert_eq!(
        node_puts[2]["spec"]["podCIDRs"],
        serde_json::json!(["10.241.0.16/28", "10.241.0.32/28"])
    );

    // The pool's watch shows the new batch: the agent holds 32 addresses.
    grown.store(true, Ordering::SeqCst);
    let nnc = next_own_nnc(&mut src, |n| {
        n.status
            .as_ref()
            .is_some_and(|s| s.assigned_ips.len() == 32)
    });
    take_status(&mut ipam, &nnc);
    assert_eq!(ipam.free(), 23);
    assert_eq!(agent_request(&mut ipam, scaler, 28).requested_ip_count, 32);

    // 3. The pods go: 32 free, above the release threshold: the agent gives back one whole
    //    batch (the highest, .32/28) and asks for 16.
    for pod in 0..9 {
        ipam.release(&pod);
    }
    let request = agent_request(&mut ipam, scaler, 28);
    assert_eq!(request.requested_ip_count, 16);
    let released: BTreeSet<Ipv4Addr> = request.ips_not_in_use.iter().copied().collect();
    assert_eq!(released.len(), 16);
    assert!(released.iter().all(|ip| {
        "10.241.0.32/28"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(ip)
    }));
    requester.request_ips("a", &request).unwrap();
    let pool_puts = puts(&api, POOL);
    assert_eq!(pool_puts.len(), 3);
    assert_eq!(pool_puts[2]["metadata"]["resourceVersion"], "12");
    assert_eq!(
        pool_puts[2]["spec"]["allocations"]["a"],
        serde_json::json!(["10.241.0.16/28"])
    );
    let node_puts = puts(&api, NODE_A);
    assert_eq!(node_puts[3]["spec"]["requestedIPCount"], 16);
    assert_eq!(
        node_puts[4]["spec"]["podCIDRs"],
        serde_json::json!(["10.241.0.16/28"])
    );

    // The VNet lists and watches were made, and every call is one deploy/'s RBAC allows.
    api.assert_calls_made(&[
        ("ferrum.dev", "ferrumippools", "list"),
        ("ferrum.dev", "ferrumippools", "watch"),
        ("ferrum.dev", "ferrumnodes", "list"),
        ("ferrum.dev", "ferrumnodes", "watch"),
    ]);
    support::assert_rbac_allows(&api.seen());
}

#[test]
fn an_exhausted_request_is_met_once_another_node_frees_a_batch() {
    let api = MockApi::default();
    let full = serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28", "10.241.0.32/28"], "c": ["10.241.0.48/28"]});
    let freed =
        serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28", "10.241.0.32/28"]});
    api.on(
        "GET",
        POOLS,
        false,
        Reply::Json(200, list(&[pool("20", full)], "20")),
    )
    .on(
        "GET",
        NODES,
        false,
        Reply::Json(200, list(&[fnode("3", 32, &["10.241.0.16/28"])], "3")),
    )
    // c gives its batch back.
    .on(
        "GET",
        POOLS,
        true,
        Reply::Watch(vec![
            serde_json::json!({"type": "MODIFIED", "object": pool("21", freed.clone())}),
        ]),
    )
    // The source claims it for a's standing request of 32, without the agent asking anew.
    .on(
        "GET",
        NODE_A,
        false,
        Reply::Json(200, fnode("3", 32, &["10.241.0.16/28"])),
    )
    .on(
        "GET",
        NODE_A,
        false,
        Reply::Json(200, fnode("3", 32, &["10.241.0.16/28"])),
    )
    .on("GET", POOL, false, Reply::Json(200, pool("21", freed)))
    .on("PUT", POOL, false, Reply::Echo(200))
    .on(
        "GET",
        NODE_A,
        false,
        Reply::Json(200, fnode("3", 32, &["10.241.0.16/28"])),
    )
    .on("PUT", NODE_A, false, Reply::Echo(200));
    let mut src = start_node_a(&api);
    // While the pool is full the node is told so (CNI ADD then fails permanently, not "try
    // again"), with the pool named.
    let nnc = next_own_nnc(&mut src, |n| n.status.is_some());
    let s = nnc.status.unwrap();
    assert!(s.subnet_exhausted);
    assert!(
        s.message.contains("FerrumIPPool default (10.241.0.0/26)"),
        "{}",
        s.message
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while puts(&api, NODE_A).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no claim; seen: {:#?}",
            api.seen()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pool_puts = puts(&api, POOL);
    assert_eq!(pool_puts.len(), 1);
    assert_eq!(pool_puts[0]["metadata"]["resourceVersion"], "21");
    assert_eq!(
        pool_puts[0]["spec"]["allocations"]["a"],
        serde_json::json!(["10.241.0.16/28", "10.241.0.48/28"])
    );
    assert_eq!(
        puts(&api, NODE_A)[0]["spec"]["podCIDRs"],
        serde_json::json!(["10.241.0.16/28", "10.241.0.48/28"])
    );
    support::assert_rbac_allows(&api.seen());
}

fn core_node(name: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "20"}})
}

fn ferrum_node(name: &str, rv: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumNode",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": rv},
        "spec": {"podCIDRs": [], "requestedIPCount": 16}
    })
}

fn wait_for(api: &MockApi, what: &str, seen: impl Fn(&[support::Seen]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen(&api.seen()) {
        assert!(
            Instant::now() < deadline,
            "{what} not seen: {:#?}",
            api.seen()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Node deleted in the cluster (watch DELETED): the collector (a, the lowest-named node
/// running an agent) removes its pool entry with the resourceVersion it read (a 409 is
/// re-read and retried) after a direct GET finds the Node gone, and deletes its FerrumNode
/// with resourceVersion/uid preconditions. A pool entry whose Node the watch does not show
/// but a GET finds (watch lag) is left alone.
#[test]
fn a_deleted_nodes_batches_go_back_to_the_pool_and_its_ferrum_node_is_deleted() {
    const CORE_NODES: &str = "/api/v1/nodes";
    const NODE_B: &str = "/api/v1/nodes/b";
    const NODE_D: &str = "/api/v1/nodes/d";
    const FNODE_B: &str = "/apis/ferrum.dev/v1alpha1/ferrumnodes/b";
    let api = MockApi::default();
    let deleted = Arc::new(AtomicBool::new(false));
    let listed = serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28"], "d": ["10.241.0.48/28"]});
    api.on(
        "GET",
        POOLS,
        false,
        Reply::Json(200, list(&[pool("10", listed.clone())], "10")),
    )
    .on(
        "GET",
        NODES,
        false,
        Reply::Json(
            200,
            list(&[ferrum_node("a", "3"), ferrum_node("b", "7")], "7"),
        ),
    )
    .on(
        "GET",
        CORE_NODES,
        false,
        Reply::Json(200, list(&[core_node("a"), core_node("b")], "20")),
    )
    .on(
        "GET",
        CORE_NODES,
        true,
        Reply::WatchWhen(
            deleted.clone(),
            vec![serde_json::json!({"type": "DELETED", "object": core_node("b")})],
        ),
    );
    // 1. d has batches but no Node in the listing; a GET finds it (the watch lags): kept.
    for _ in 0..8 {
        api.on(
            "GET",
            POOL,
            false,
            Reply::Json(200, pool("10", listed.clone())),
        )
        .on("GET", NODE_D, false, Reply::Json(200, core_node("d")));
    }
    let mut src = start_node_a(&api);
    next_own_nnc(&mut src, |n| n.status.is_some());
    wait_for(&api, "GET of node d", |seen| {
        seen.iter().any(|s| s.method == "GET" && s.path == NODE_D)
    });
    // Let the rest of the listing's events pass, then script the collection of b.
    std::thread::sleep(Duration::from_millis(500));
    api.reset("GET", POOL, false);
    api.reset("GET", NODE_D, false);
    assert!(puts(&api, POOL).is_empty(), "d's entry was touched");
    let with_c = serde_json::json!({"a": ["10.241.0.16/28"], "b": ["10.241.0.0/28"], "c": ["10.241.0.32/28"], "d": ["10.241.0.48/28"]});
    api.on("GET", POOL, false, Reply::Json(200, pool("10", listed)))
        .on(
            "PUT",
            POOL,
            false,
            Reply::Json(409, status(409, "Conflict", "the object has been modified")),
        )
        .on("GET", POOL, false, Reply::Json(200, pool("11", with_c)))
        .on("PUT", POOL, false, Reply::Echo(200))
        .on(
            "GET",
            FNODE_B,
            false,
            Reply::Json(200, ferrum_node("b", "7")),
        )
        .on(
            "DELETE",
            FNODE_B,
            false,
            Reply::Json(200, ferrum_node("b", "7")),
        );

    // 2. b's Node is deleted.
    deleted.store(true, Ordering::SeqCst);
    wait_for(&api, "DELETE of b's FerrumNode", |seen| {
        seen.iter()
            .any(|s| s.method == "DELETE" && s.path == FNODE_B)
    });
    let pool_puts = puts(&api, POOL);
    assert_eq!(pool_puts.len(), 2, "one lost race, one win");
    assert_eq!(pool_puts[0]["metadata"]["resourceVersion"], "10");
    assert_eq!(pool_puts[1]["metadata"]["resourceVersion"], "11");
    for put in &pool_puts {
        let allocations = put["spec"]["allocations"].as_object().unwrap();
        assert!(!allocations.contains_key("b"), "{put}");
        assert_eq!(allocations["a"], serde_json::json!(["10.241.0.16/28"]));
        assert_eq!(allocations["d"], serde_json::json!(["10.241.0.48/28"]));
    }
    assert_eq!(
        pool_puts[1]["spec"]["allocations"]["c"],
        serde_json::json!(["10.241.0.32/28"]),
        "the concurrent claim is kept"
    );
    let seen = api.seen();
    let first = |method: &str, path: &str| {
        seen.iter()
            .position(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("no {method} {path}"))
    };
    assert!(
        first("GET", NODE_B) < first("PUT", POOL),
        "the Node's absence is checked before the pool is written"
    );
    let delete = seen
        .iter()
        .find(|s| s.method == "DELETE" && s.path == FNODE_B)
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&delete.body).unwrap();
    assert_eq!(
        body["preconditions"],
        serde_json::json!({"resourceVersion": "7", "uid": "uid-b"}),
        "{body}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.method == "DELETE" && s.path != FNODE_B),
        "only b's FerrumNode is deleted"
    );
    support::assert_rbac_allows(&seen);
}

/// Without a usable FerrumIPPool the node's NodeNetworkConfig comes without status but with
/// the reason (which the agent reports as why it is not ready): missing, then outside the
/// agent's --cluster-pod-cidr.
#[test]
fn the_reason_the_pool_is_unusable_comes_with_the_node_network_config() {
    let api = MockApi::default();
    let foreign = Arc::new(AtomicBool::new(false));
    let mut outside = pool("30", serde_json::json!({}));
    outside["spec"]["cidr"] = "10.99.0.0/24".into();
    api.on(
        "GET",
        POOLS,
        true,
        Reply::WatchWhen(
            foreign.clone(),
            vec![serde_json::json!({"type": "ADDED", "object": outside})],
        ),
    );
    let mut src = start_node_a(&api);
    let nnc = next_own_nnc(&mut src, |n| n.pending_reason().is_some());
    assert!(nnc.status.is_none());
    let why = nnc.pending_reason().unwrap();
    assert!(
        why.contains("FerrumIPPool default does not exist") && why.contains("ippool.yaml"),
        "{why}"
    );
    foreign.store(true, Ordering::SeqCst);
    let nnc = next_own_nnc(&mut src, |n| {
        n.pending_reason()
            .is_some_and(|r| r.contains("10.99.0.0/24"))
    });
    assert!(nnc.status.is_none());
    assert!(
        nnc.pending_reason()
            .unwrap()
            .contains("--cluster-pod-cidr 10.241.0.0/16")
    );
}
