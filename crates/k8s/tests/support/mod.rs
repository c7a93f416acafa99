//! A scripted Kubernetes API server as a tower service: the real kube client sends its HTTP
//! requests here and gets recorded API-server responses back, in order, per (method, path,
//! watch). Every request is logged, so tests can check which API calls the code makes.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kube::client::Body;

#[derive(Debug, Clone)]
pub enum Reply {
    /// A plain response: status code and JSON body.
    Json(u16, serde_json::Value),
    /// A watch response: these events, one JSON document per line, then the stream ends.
    Watch(Vec<serde_json::Value>),
    /// Echo the request body back with this status (create/replace/patch).
    Echo(u16),
    /// Never answer (a watch that stays open).
    Hang,
    /// A watch response sent only once the flag is set (a change at a moment the test picks);
    /// then the stream ends (the client watches again from the last resourceVersion).
    WatchWhen(Arc<AtomicBool>, Vec<serde_json::Value>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|p| p == "watch=true")
    }
    pub fn param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")).map(str::to_string))
    }
}

type Key = (String, String, bool);

#[derive(Clone, Default)]
pub struct MockApi {
    script: Arc<Mutex<HashMap<Key, VecDeque<Reply>>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockApi {
    /// Queues a reply for (method, path, is_watch).
    pub fn on(&self, method: &str, path: &str, watch: bool, reply: Reply) -> &Self {
        self.script
            .lock()
            .unwrap()
            .entry((method.into(), path.into(), watch))
            .or_default()
            .push_back(reply);
        self
    }

    /// Drops the replies still queued for (method, path, is_watch).
    pub fn reset(&self, method: &str, path: &str, watch: bool) {
        self.script
            .lock()
            .unwrap()
            .remove(&(method.into(), path.into(), watch));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits up to ten seconds for every (apiGroup, resource, verb) in `calls` to be made, and
    /// panics naming the ones missing. Watches start on their own tasks after their lists, so
    /// a test that has seen a list's data cannot assume the watch request has been sent yet.
    pub fn assert_calls_made(&self, calls: &[(&str, &str, &str)]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let made: std::collections::BTreeSet<_> = self.seen().iter().map(rbac_call).collect();
            let missing: Vec<_> = calls
                .iter()
                .filter(|(g, r, v)| !made.contains(&(g.to_string(), r.to_string(), v.to_string())))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{missing:?} not made; made: {made:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Default answers: an empty list for collections, an open watch for watches, 404 for
    /// anything else (a named object that does not exist).
    fn default_reply(method: &str, path: &str, watch: bool) -> Reply {
        let segments = path.trim_matches('/').split('/').count();
        let collection = (path.starts_with("/api/") && segments == 3)
            || (path.starts_with("/apis/") && segments == 4);
        match (method, watch) {
            ("GET", true) => Reply::Hang,
            ("GET", false) if collection => Reply::Json(200, list(&[], "1")),
            _ => Reply::Json(404, status(404, "NotFound", "not found")),
        }
    }

    /// A kube client whose requests this mock answers. Call inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: http::Request<Body>| {
            let me = me.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let seen = Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body: String::from_utf8_lossy(&bytes).into_owned(),
                };
                let key = (seen.method.clone(), seen.path.clone(), seen.is_watch());
                me.seen.lock().unwrap().push(seen.clone());
                let reply = me
                    .script
                    .lock()
                    .unwrap()
                    .get_mut(&key)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or_else(|| Self::default_reply(&key.0, &key.1, key.2));
                let (code, body) = match reply {
                    Reply::Json(code, v) => (code, serde_json::to_vec(&v).unwrap()),
                    Reply::Watch(events) => {
                        let mut out = Vec::new();
                        for e in events {
                            out.extend(serde_json::to_vec(&e).unwrap());
                            out.push(b'\n');
                        }
                        (200, out)
                    }
                    Reply::Echo(code) => (code, bytes.to_vec()),
                    Reply::Hang => futures::future::pending().await,
                    Reply::WatchWhen(flag, events) => {
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        let mut out = Vec::new();
                        for e in events {
                            out.extend(serde_json::to_vec(&e).unwrap());
                            out.push(b'\n');
                        }
                        (200, out)
                    }
                };
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(body))
                        .unwrap(),
                )
            }
        });
        kube::Client::new(svc, "default")
    }
}

pub fn list(items: &[serde_json::Value], rv: &str) -> serde_json::Value {
    serde_json::json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
}

pub fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

/// A recorded response from tests/recorded/.
pub fn recorded(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A recorded watch stream (one event per line, as the API server sends them).
pub fn recorded_stream(name: &str) -> Vec<serde_json::Value> {
    let path = format!("{}/tests/recorded/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path}: {e}: {l}")))
        .collect()
}

/// (apiGroup, resource, verb) of one request, as RBAC sees it.
pub fn rbac_call(seen: &Seen) -> (String, String, String) {
    let path = seen.path.trim_matches('/');
    let segs: Vec<&str> = path.split('/').collect();
    let (group, rest) = match segs.first() {
        Some(&"api") => (String::new(), &segs[2..]),
        Some(&"apis") => (segs[1].to_string(), &segs[3..]),
        _ => panic!("not an API path: {}", seen.path),
    };
    // namespaces/NS/... is a namespaced resource; "namespaces" alone is the resource itself.
    let rest = if rest.len() >= 3 && rest[0] == "namespaces" {
        &rest[2..]
    } else {
        rest
    };
    let resource = match rest.get(2) {
        Some(sub) => format!("{}/{sub}", rest[0]),
        None => rest[0].to_string(),
    };
    let named = rest.len() >= 2;
    let verb = match (seen.method.as_str(), seen.is_watch(), named) {
        ("GET", true, _) => "watch",
        ("GET", false, false) => "list",
        ("GET", false, true) => "get",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", _, _) => "delete",
        (m, _, _) => panic!("unexpected method {m}"),
    };
    (group, resource, verb.to_string())
}

/// (apiGroup, resource, verb) that deploy/'s ClusterRole grants.
pub fn granted() -> std::collections::BTreeSet<(String, String, String)> {
    use serde::Deserialize;
    let path = format!("{}/../../deploy/ferrum.yaml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let role = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ClusterRole")
        .expect("deploy/ferrum.yaml has a ClusterRole");
    let mut out = std::collections::BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    assert_ne!(v, "*", "no wildcard verbs");
                    assert_ne!(r, "*", "no wildcard resources");
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    out
}

/// Every request the code made is one deploy/'s RBAC allows.
pub fn assert_rbac_allows(seen: &[Seen]) {
    let granted = granted();
    for s in seen {
        let call = rbac_call(s);
        assert!(
            granted.contains(&call),
            "deploy/ RBAC does not allow {call:?} ({} {})",
            s.method,
            s.path
        );
    }
}
