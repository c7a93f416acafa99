//! Objects the agent cannot handle (a NetworkPolicy with an invalid CIDR, a Service with an
//! unsupported protocol), served by a scripted API server to the real kube client: each is
//! logged and recorded as a Warning Event (events.k8s.io/v1) on the object, is never passed
//! to the agent, and blocks neither the other objects of its kind nor later changes.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrum_k8s::KubeSource;
use ferrum_model::{Object, WatchEvent};
use support::{MockApi, Reply, list};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn node(name: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "5"},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.224.0.10"}]}})
}

fn service(name: &str, protocol: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "resourceVersion": "6"},
        "spec": {"clusterIP": "10.0.0.20", "clusterIPs": ["10.0.0.20"], "selector": {"app": name},
                 "ports": [{"port": 53, "targetPort": 53, "protocol": protocol}]}})
}

fn policy(name: &str, rv: &str, cidr: &str) -> serde_json::Value {
    serde_json::json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": "prod", "uid": format!("uid-{name}"), "resourceVersion": rv},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": cidr}}]}]}})
}

fn describe(e: &WatchEvent) -> String {
    let obj = |o: &Object| {
        format!(
            "{}@{}",
            o.name(),
            o.metadata().resource_version.as_deref().unwrap_or("")
        )
    };
    match e {
        WatchEvent::Upsert { object } => format!("upsert {}", obj(object)),
        WatchEvent::Delete { object } => format!("delete {}", obj(object)),
        WatchEvent::Relist => "relist".into(),
        WatchEvent::Synced { .. } => "synced".into(),
    }
}

#[test]
fn bad_objects_become_events_and_logs_and_block_nothing() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .unwrap();

    let api = MockApi::default();
    const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
    api.on(
        "GET",
        "/api/v1/nodes",
        false,
        Reply::Json(200, list(&[node("a")], "5")),
    )
    .on(
        "GET",
        "/api/v1/services",
        false,
        Reply::Json(
            200,
            list(&[service("dns", "ICMP"), service("web", "UDP")], "6"),
        ),
    )
    .on(
        "GET",
        POLICIES,
        false,
        Reply::Json(
            200,
            list(
                &[
                    policy("bad-cidr", "7", "10.0.0.0/33"),
                    policy("allow", "8", "10.1.0.0/16"),
                ],
                "8",
            ),
        ),
    )
    // Later: a new policy, then the bad one fixed.
    .on(
        "GET",
        POLICIES,
        true,
        Reply::Watch(vec![
            serde_json::json!({"type": "ADDED", "object": policy("later", "9", "10.2.0.0/16")}),
            serde_json::json!({"type": "MODIFIED", "object": policy("bad-cidr", "10", "10.3.0.0/16")}),
        ]),
    );
    for ns in ["default", "prod"] {
        api.on(
            "POST",
            &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
            false,
            Reply::Echo(201),
        );
    }

    let mock = api.clone();
    let mut src = KubeSource::start(Arc::new(move || Ok(mock.client())), "a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while !got.iter().any(|e| e == "upsert bad-cidr@10") {
        assert!(Instant::now() < deadline, "timed out; events: {got:?}");
        if let Some(e) = src.next_event_timeout(Duration::from_millis(200)).unwrap() {
            got.push(describe(&e));
        }
    }
    // The good objects flow; the bad ones never reach the agent until fixed.
    let first_sync = got.iter().position(|e| e == "synced").unwrap();
    let mut initial: Vec<&str> = got[..first_sync].iter().map(String::as_str).collect();
    initial.sort();
    assert_eq!(initial, ["upsert a@5", "upsert allow@8", "upsert web@6"]);
    let later: Vec<&str> = got[first_sync..]
        .iter()
        .map(String::as_str)
        .filter(|e| *e != "synced")
        .collect();
    assert_eq!(later, ["upsert later@9", "upsert bad-cidr@10"]);

    // One Warning Event on each bad object, in its namespace, naming the field and value.
    let events: Vec<(String, serde_json::Value)> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST" && s.path.ends_with("/events"))
        .map(|s| (s.path.clone(), serde_json::from_str(&s.body).unwrap()))
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    let find = |kind: &str| {
        events
            .iter()
            .find(|(_, e)| e["regarding"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no Event about a {kind}: {events:#?}"))
    };
    let (path, svc) = find("Service");
    assert!(path.contains("/namespaces/default/"), "{path}");
    assert_eq!(svc["type"], "Warning");
    assert_eq!(svc["reason"], "FerrumRejected");
    assert_eq!(svc["regarding"]["name"], "dns");
    let note = svc["note"].as_str().unwrap();
    assert!(
        note.contains("spec.ports[0].protocol") && note.contains("ICMP"),
        "{note}"
    );
    let (path, np) = find("NetworkPolicy");
    assert!(path.contains("/namespaces/prod/"), "{path}");
    assert_eq!(np["regarding"]["name"], "bad-cidr");
    assert_eq!(np["regarding"]["apiVersion"], "networking.k8s.io/v1");
    let note = np["note"].as_str().unwrap();
    assert!(
        note.contains("spec.egress[0].to[0].ipBlock.cidr") && note.contains("10.0.0.0/33"),
        "{note}"
    );

    // And in the logs, naming the object.
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for object in ["Service default/dns", "NetworkPolicy prod/bad-cidr"] {
        assert!(
            text.contains("ignoring an object the agent cannot handle") && text.contains(object),
            "{object} not logged:\n{text}"
        );
    }
    support::assert_rbac_allows(&api.seen());
}
