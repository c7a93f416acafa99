//! The ferrum-agent binary in Kubernetes mode: `--kubeconfig` pointing at a small HTTP API
//! server (recorded responses) on loopback inside a throwaway network namespace. The agent
//! lists the cluster through the real kube client, takes its pod CIDR from its Node's
//! spec.podCIDRs, turns Ready and writes that into its FerrumNode status; a NetworkPolicy with
//! an invalid CIDR becomes a Warning Event and does not stop it. Needs root and bpffs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrum_datapath::netns::run_in_netns;

const NODE: &str = "k1";

struct TestNode {
    netns: String,
    pin_dir: PathBuf,
    agent: Option<Child>,
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().unwrap().success();
    assert!(ok, "ip {args:?}");
}

impl TestNode {
    fn new() -> Self {
        let pid = std::process::id();
        let node = TestNode {
            netns: format!("fa-k8s-{pid}"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/ferrum-test-k8s-{pid}")),
            agent: None,
        };
        let n = node.netns.as_str();
        ip(&["netns", "add", n]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&[
            "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "fabric0",
        ]);
        ip(&["-n", n, "addr", "add", "10.224.0.4/16", "dev", "eth0"]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "link", "set", "fabric0", "up"]);
        node
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.netns)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = ferrum_datapath::bpf::remove_pins(&self.pin_dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn node(name: &str, ip: &str, cidr: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"name": name, "resourceVersion": "5", "uid": format!("uid-{name}")},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

/// A policy name whose Event this node's agent records (one agent per object does; see
/// ferrum_k8s::merge::event_reporter).
fn bad_policy_name() -> String {
    use ferrum_model::Object;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    (0..)
        .map(|i| format!("bad-{i}"))
        .find(|name| {
            let mut np = NetworkPolicy::default();
            np.metadata.name = Some(name.clone());
            np.metadata.namespace = Some("default".into());
            ferrum_k8s::merge::event_reporter(&Object::NetworkPolicy(np), ["k1", "k2"], NODE)
                == NODE
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    body: String,
}

/// Answers one request; None keeps the connection open without answering (a watch).
fn answer(seen: &[Seen], req: &Seen) -> Option<(u16, serde_json::Value)> {
    let path = req.target.split('?').next().unwrap_or_default();
    let list = |items: Vec<serde_json::Value>| serde_json::json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": items});
    if req.target.contains("watch=true") {
        return None;
    }
    let status_path = format!("/apis/ferrum.dev/v1alpha1/ferrumnodes/{NODE}/status");
    Some(match (req.method.as_str(), path) {
        ("GET", "/api/v1/nodes") => (
            200,
            list(vec![
                node(NODE, "10.224.0.4", "10.244.5.0/24"),
                node("k2", "10.224.0.5", "10.244.6.0/24"),
            ]),
        ),
        ("GET", "/apis/networking.k8s.io/v1/networkpolicies") => (
            200,
            list(vec![serde_json::json!({
                "metadata": {"name": bad_policy_name(), "namespace": "default", "resourceVersion": "7", "uid": "uid-bad"},
                "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                         "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/99"}}]}]}
            })]),
        ),
        ("GET", _) if path.matches('/').count() <= 4 => (200, list(vec![])),
        ("PATCH", p) if p == status_path => {
            let created = seen
                .iter()
                .any(|s| s.method == "POST" && s.target.contains("/ferrumnodes"));
            if created {
                let patch: serde_json::Value = serde_json::from_str(&req.body).unwrap_or_default();
                (
                    200,
                    serde_json::json!({"apiVersion": "ferrum.dev/v1alpha1", "kind": "FerrumNode",
                    "metadata": {"name": NODE, "resourceVersion": "20"}, "spec": {"podCIDRs": []},
                    "status": patch["status"]}),
                )
            } else {
                (
                    404,
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )
            }
        }
        ("POST", _) => (201, serde_json::from_str(&req.body).unwrap_or_default()),
        _ => (
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
    })
}

fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req = Seen {
            method,
            target,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let reply = {
            let mut all = seen.lock().unwrap();
            let reply = answer(&all, &req);
            all.push(req);
            reply
        };
        match reply {
            Some((code, json)) => {
                let body = serde_json::to_vec(&json).unwrap();
                let head = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                if out
                    .write_all(head.as_bytes())
                    .and_then(|_| out.write_all(&body))
                    .is_err()
                {
                    return;
                }
            }
            None => {
                // An open watch with no events: headers only, then silence until the test ends.
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
                let _ = out.flush();
                std::thread::sleep(Duration::from_secs(3600));
                return;
            }
        }
    }
}

#[test]
fn agent_runs_against_a_kubernetes_api_server() {
    let mut test = TestNode::new();
    let dir = tempfile::tempdir().unwrap();
    // The listener belongs to the namespace it was made in, whichever thread serves it.
    let listener =
        run_in_netns(&test.path(), || TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    {
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || serve(stream, seen));
            }
        });
    }
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: t\n  user: {{}}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\ncurrent-context: t\n"
    )).unwrap();

    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    test.agent = Some(
        Command::new(env!("CARGO_BIN_EXE_ferrum-agent"))
            .args(["--node-name", NODE, "--uplink", "eth0"])
            .arg("--netns")
            .arg(test.path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--bpf-pin-dir")
            .arg(&test.pin_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let status_path = format!("/apis/ferrum.dev/v1alpha1/ferrumnodes/{NODE}/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let found = seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.target.starts_with(&status_path) && s.body.contains("\"ready\":true"))
            .cloned();
        if let Some(s) = found {
            break s;
        }
        if let Some(agent) = test.agent.as_mut()
            && let Ok(Some(code)) = agent.try_wait()
        {
            panic!(
                "agent exited ({code}): {}",
                std::fs::read_to_string(dir.path().join("agent.log")).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "agent never reported ready; log:\n{}\nrequests: {:#?}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap(),
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let body: serde_json::Value = serde_json::from_str(&ready.body).unwrap();
    assert_eq!(body["status"]["ready"], true, "{body}");
    assert!(body["status"]["realizedRevision"].as_u64().unwrap() >= 1);

    let all = seen.lock().unwrap().clone();
    // It watched every kind, after listing it.
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/api/v1/services",
        "/api/v1/nodes",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/apis/networking.k8s.io/v1/networkpolicies",
    ] {
        assert!(
            all.iter()
                .any(|s| s.target.starts_with(&format!("{path}?"))
                    && s.target.contains("watch=true")),
            "no watch of {path}"
        );
    }
    // The bad policy became a Warning Event on it; the agent kept going (it is ready above).
    let event = all
        .iter()
        .find(|s| s.method == "POST" && s.target.contains("/events"))
        .expect("an Event");
    let event: serde_json::Value = serde_json::from_str(&event.body).unwrap();
    assert_eq!(event["regarding"]["name"], bad_policy_name().as_str());
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["type"], "Warning");
    // The node's pod block is the one in its Node's spec.podCIDRs (persisted by IPAM).
    let ipam = std::fs::read_to_string(dir.path().join("state/ipam.json")).unwrap();
    assert!(ipam.contains("10.244.5.0/24"), "{ipam}");
}
