//! Claiming VNet batches through the real kube client against a scripted API server: the
//! replace carries the resourceVersion read, a 409 Conflict makes the agent re-read and
//! re-plan, and the result is mirrored into the node's FerrumNode.

mod support;

use ferrum_k8s::crd::{FerrumIPPool, FerrumNode};
use ferrum_k8s::pool::{PoolError, claim_batches};
use kube::Api;
use support::{MockApi, Reply, status};

const POOL: &str = "/apis/ferrum.dev/v1alpha1/ferrumippools/default";

fn pool(rv: &str, allocations: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumIPPool",
        "metadata": {"name": "default", "resourceVersion": rv},
        "spec": {"cidr": "10.241.0.0/24", "batchPrefixLength": 28, "allocations": allocations}
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_lost_race_rereads_and_takes_the_next_free_batch() {
    let api = MockApi::default();
    // First read: nothing allocated. Someone else (node b) takes .0/28 meanwhile: our replace
    // with resourceVersion 7 gets 409. Second read shows b's batch; we take .16/28.
    api.on("GET", POOL, false, Reply::Json(200, pool("7", serde_json::json!({}))))
        .on("PUT", POOL, false, Reply::Json(409, status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again")))
        .on("GET", POOL, false, Reply::Json(200, pool("8", serde_json::json!({"b": ["10.241.0.0/28"]}))))
        .on("PUT", POOL, false, Reply::Echo(200))
        .on("POST", "/apis/ferrum.dev/v1alpha1/ferrumnodes", false, Reply::Echo(201));
    let got = rt().block_on(async {
        let client = api.client();
        claim_batches(
            &Api::<FerrumIPPool>::all(client.clone()),
            &Api::<FerrumNode>::all(client),
            "a",
            1,
        )
        .await
    });
    assert_eq!(got.unwrap(), vec!["10.241.0.16/28".parse().unwrap()]);

    let puts: Vec<serde_json::Value> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT")
        .map(|s| serde_json::from_str(&s.body).unwrap())
        .collect();
    assert_eq!(puts.len(), 2);
    // Each write carries the resourceVersion it was planned from.
    assert_eq!(puts[0]["metadata"]["resourceVersion"], "7");
    assert_eq!(puts[0]["spec"]["allocations"]["a"][0], "10.241.0.0/28");
    assert_eq!(puts[1]["metadata"]["resourceVersion"], "8");
    assert_eq!(puts[1]["spec"]["allocations"]["a"][0], "10.241.0.16/28");
    assert_eq!(
        puts[1]["spec"]["allocations"]["b"][0], "10.241.0.0/28",
        "b's claim kept"
    );
    // The node's FerrumNode mirrors its batches.
    let created = api.seen().into_iter().find(|s| s.method == "POST").unwrap();
    let node: serde_json::Value = serde_json::from_str(&created.body).unwrap();
    assert_eq!(node["metadata"]["name"], "a");
    assert_eq!(
        node["spec"]["podCIDRs"],
        serde_json::json!(["10.241.0.16/28"])
    );
    support::assert_rbac_allows(&api.seen());
}

#[test]
fn an_existing_claim_writes_nothing_and_endless_conflicts_give_up() {
    let api = MockApi::default();
    api.on("GET", POOL, false, Reply::Json(200, pool("9", serde_json::json!({"a": ["10.241.0.32/28"]}))))
        .on("GET", "/apis/ferrum.dev/v1alpha1/ferrumnodes/a", false, Reply::Json(200, serde_json::json!({
            "apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumNode",
            "metadata": {"name": "a", "resourceVersion": "3"}, "spec": {"podCIDRs": ["10.241.0.32/28"]}
        })));
    let got = rt().block_on(async {
        let client = api.client();
        claim_batches(&Api::all(client.clone()), &Api::all(client), "a", 1).await
    });
    assert_eq!(got.unwrap(), vec!["10.241.0.32/28".parse().unwrap()]);
    assert!(
        api.seen().iter().all(|s| s.method == "GET"),
        "{:#?}",
        api.seen()
    );

    let api = MockApi::default();
    for i in 0..ferrum_k8s::pool::CLAIM_ATTEMPTS {
        api.on(
            "GET",
            POOL,
            false,
            Reply::Json(200, pool(&i.to_string(), serde_json::json!({}))),
        )
        .on(
            "PUT",
            POOL,
            false,
            Reply::Json(409, status(409, "Conflict", "modified")),
        );
    }
    let got = rt().block_on(async {
        let client = api.client();
        claim_batches(&Api::all(client.clone()), &Api::all(client), "a", 1).await
    });
    assert!(matches!(got, Err(PoolError::Contended { .. })), "{got:?}");
    // No pool at all: a clear error.
    let api = MockApi::default();
    let got = rt().block_on(async {
        let client = api.client();
        claim_batches(&Api::all(client.clone()), &Api::all(client), "a", 1).await
    });
    assert!(matches!(got, Err(PoolError::Missing)), "{got:?}");
}
