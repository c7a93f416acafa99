//! Drives the real ferrum-cni binary exactly as a container runtime does: CNI_* environment
//! variables, the network config on stdin, the result or error JSON on stdout.
//!
//! Every test that lets the plugin touch the kernel runs it inside a test node namespace
//! (`nsenter --net=...`), so nothing reaches the machine's root namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_ferrum-cni");

struct Outcome {
    ok: bool,
    stdout: Value,
    stderr: String,
}

impl Outcome {
    fn code(&self) -> u64 {
        self.stdout["code"].as_u64().unwrap_or(0)
    }
    fn msg(&self) -> String {
        self.stdout["msg"].as_str().unwrap_or("").to_string()
    }
}

/// Runs the plugin with exactly `env` (nothing inherited) and `stdin`, optionally in a netns.
fn run_plugin(netns: Option<&Path>, env: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg(PLUGIN);
            c
        }
        None => Command::new(PLUGIN),
    };
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ferrum-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for ferrum-cni");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stdout = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
    };
    Outcome {
        ok: out.status.success(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A named netns, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> Self {
        let name = format!("fe-cni-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip")
            .success();
        assert!(ok, "ip netns add {name}");
        Self { name }
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    fn ip(&self, args: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn missing_socket() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock").display().to_string();
    (dir, sock)
}

fn conf(socket: &str) -> String {
    json!({"cniVersion": "1.1.0", "name": "ferrum", "type": "ferrum-cni", "agentSocket": socket})
        .to_string()
}

fn host_ifname(container_id: &str, ifname: &str) -> String {
    ferrum_agent_api::host_ifname(&ferrum_agent_api::AttachmentKey {
        container_id: container_id.into(),
        ifname: ifname.into(),
    })
}

#[test]
fn version_answers_for_each_supported_version() {
    for v in ["1.0.0", "1.1.0"] {
        let out = run_plugin(
            None,
            &[("CNI_COMMAND", "VERSION")],
            &json!({"cniVersion": v}).to_string(),
        );
        assert!(out.ok, "{}", out.stderr);
        assert_eq!(
            out.stdout,
            json!({"cniVersion": v, "supportedVersions": ["1.0.0", "1.1.0"]})
        );
    }
}

#[test]
fn version_with_an_unsupported_request_still_lists_what_we_speak() {
    // A newer runtime discovers our versions this way and negotiates down.
    let out = run_plugin(
        None,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"9.0.0"}"#,
    );
    assert!(out.ok);
    assert_eq!(out.stdout["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    assert_eq!(out.stdout["cniVersion"], "1.1.0");
}

#[test]
fn unsupported_config_version_is_error_1() {
    let out = run_plugin(
        None,
        &[("CNI_COMMAND", "STATUS")],
        r#"{"cniVersion":"0.4.0","name":"ferrum","type":"ferrum-cni"}"#,
    );
    assert!(!out.ok);
    assert_eq!(out.code(), 1);
    assert_eq!(out.msg(), "incompatible CNI version");
}

#[test]
fn malformed_json_is_error_6() {
    let out = run_plugin(None, &[("CNI_COMMAND", "STATUS")], "{\"cniVersion\": ");
    assert!(!out.ok);
    assert_eq!(out.code(), 6, "{:?}", out.stdout);
    assert_eq!(out.stdout["cniVersion"], "1.1.0");
}

#[test]
fn invalid_fields_are_error_7_naming_the_field() {
    let cases = [
        (json!({"cniVersion": "1.0.0", "type": "ferrum-cni"}), "name"),
        (json!({"cniVersion": "1.0.0", "name": "ferrum"}), "type"),
        (
            json!({"cniVersion": "1.0.0", "name": "ferrum", "type": "ferrum-cni", "mtu": 10}),
            "mtu",
        ),
        (
            json!({"cniVersion": "1.0.0", "name": "ferrum", "type": "ferrum-cni", "agentSocket": "x.sock"}),
            "agentSocket",
        ),
        (
            json!({"name": "ferrum", "type": "ferrum-cni"}),
            "cniVersion",
        ),
    ];
    for (config, field) in cases {
        let out = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &config.to_string());
        assert!(!out.ok, "{field}");
        assert_eq!(out.code(), 7, "{field}: {:?}", out.stdout);
        assert!(out.msg().contains(field), "{field}: {}", out.msg());
    }
}

#[test]
fn error_answers_in_the_config_version() {
    let (_dir, sock) = missing_socket();
    let config =
        json!({"cniVersion": "1.0.0", "name": "ferrum", "type": "ferrum-cni", "agentSocket": sock});
    let out = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &config.to_string());
    assert!(!out.ok);
    assert_eq!(out.stdout["cniVersion"], "1.0.0");
}

#[test]
fn missing_add_variables_are_error_4_naming_them() {
    let (_dir, sock) = missing_socket();
    let full = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/nowhere"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    for var in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let env: Vec<_> = full.iter().copied().filter(|(k, _)| *k != var).collect();
        let out = run_plugin(None, &env, &conf(&sock));
        assert!(!out.ok, "{var}");
        assert_eq!(out.code(), 4, "{var}: {:?}", out.stdout);
        assert!(out.msg().contains(var), "{var}: {}", out.msg());
    }
}

#[test]
fn unknown_command_is_error_4() {
    let (_dir, sock) = missing_socket();
    let out = run_plugin(None, &[("CNI_COMMAND", "REPAIR")], &conf(&sock));
    assert!(!out.ok);
    assert_eq!(out.code(), 4);
    assert!(out.msg().contains("REPAIR"));
}

#[test]
fn add_into_a_missing_netns_is_error_3_and_asks_nobody() {
    let (_dir, sock) = missing_socket();
    let netns = format!("/run/netns/fe-cni-absent-{}", std::process::id());
    let out = run_plugin(
        None,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf(&sock),
    );
    assert!(!out.ok);
    assert_eq!(out.code(), 3, "{:?}", out.stdout);
    assert!(out.msg().contains(&netns));
}

#[test]
fn add_with_the_agent_socket_missing_is_error_11_and_creates_nothing() {
    let node = TestNetns::new("add11-node");
    let pod = TestNetns::new("add11-pod");
    let (_dir, sock) = missing_socket();
    let pod_path = pod.path().display().to_string();
    let out = run_plugin(
        Some(&node.path()),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c11"),
            ("CNI_NETNS", &pod_path),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
        ],
        &conf(&sock),
    );
    assert!(!out.ok);
    assert_eq!(out.code(), 11, "{:?}", out.stdout);
    assert!(
        out.stdout["details"].as_str().unwrap_or("").contains(&sock),
        "details name the socket: {:?}",
        out.stdout
    );
    let (_, links) = node.ip("-o link show");
    assert!(!links.contains("fe"), "no host veth may be left: {links}");
    let (_, pod_links) = pod.ip("-o link show");
    assert!(!pod_links.contains("eth0"), "{pod_links}");
}

#[test]
fn del_with_the_agent_unreachable_removes_the_veth_then_asks_for_a_retry() {
    let node = TestNetns::new("del-node");
    let pod = TestNetns::new("del-pod");
    let (_dir, sock) = missing_socket();
    let host = host_ifname("cdel", "eth0");
    // What a previous ADD left: the host end in the node, eth0 in the pod.
    let (ok, _) = node.ip(&format!(
        "link add {host} type veth peer name eth0 netns {}",
        pod.name
    ));
    assert!(ok, "create veth");
    let pod_path = pod.path().display().to_string();
    let out = run_plugin(
        Some(&node.path()),
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "cdel"),
            ("CNI_NETNS", &pod_path),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf(&sock),
    );
    assert!(!out.ok);
    assert_eq!(out.code(), 11, "{:?} {}", out.stdout, out.stderr);
    let (exists, _) = node.ip(&format!("link show {host}"));
    assert!(!exists, "host veth must be gone");
    let (pod_eth0, _) = pod.ip("link show eth0");
    assert!(!pod_eth0, "pod end goes with it");
}

#[test]
fn status_with_the_agent_missing_is_error_50() {
    let (_dir, sock) = missing_socket();
    let out = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf(&sock));
    assert!(!out.ok);
    assert_eq!(out.code(), 50, "{:?}", out.stdout);
    assert!(out.stdout["details"].as_str().unwrap_or("").contains(&sock));
}

#[test]
fn gc_needs_valid_attachments_and_the_agent() {
    let (_dir, sock) = missing_socket();
    let out = run_plugin(None, &[("CNI_COMMAND", "GC")], &conf(&sock));
    assert_eq!(out.code(), 7);
    assert!(out.msg().contains("cni.dev/valid-attachments"));
    let config = json!({"cniVersion": "1.1.0", "name": "ferrum", "type": "ferrum-cni",
        "agentSocket": sock, "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]});
    let out = run_plugin(None, &[("CNI_COMMAND", "GC")], &config.to_string());
    assert_eq!(out.code(), 11);
}

/// ADD / CHECK / DEL against the real ferrum-agent, both inside a test node namespace, with the
/// real lab control plane (in this process) giving the node its pod block.
#[test]
fn add_check_del_round_trip_with_the_real_agent() {
    let agent_bin = Path::new(PLUGIN)
        .parent()
        .expect("target dir")
        .join("ferrum-agent");
    assert!(
        agent_bin.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        agent_bin.display()
    );
    let cp_dir = tempfile::tempdir().expect("control plane dir");
    let cp = ferrum_lab::controlplane::ControlPlane::open(cp_dir.path()).expect("control plane");
    let node_yaml = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-1
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24]
status:
  addresses:
  - {type: InternalIP, address: 10.224.0.10}
"#;
    cp.apply(ferrum_model::parse_documents(node_yaml).expect("node yaml"))
        .expect("apply node");
    let cp_socket = cp_dir.path().join("cp.sock");
    let _server = ferrum_lab::server::serve(cp, &cp_socket).expect("serve control plane");
    let node = TestNetns::new("rt-node");
    let pod = TestNetns::new("rt-pod");
    assert!(node.ip("link add eth0 type veth peer name fabric0").0);
    assert!(node.ip("addr add 10.224.0.10/16 dev eth0").0);
    assert!(node.ip("link set eth0 up").0);
    let state = tempfile::tempdir().expect("state dir");
    let sock = state.path().join("agent.sock").display().to_string();
    let pins = format!("/sys/fs/bpf/ferrum-test-{}", std::process::id());
    let lab_socket = cp_socket.display().to_string();
    let mut agent = Command::new(&agent_bin)
        .args(["--node-name", "node-1"])
        .arg("--netns")
        .arg(node.path())
        .args(["--socket", &sock])
        .arg("--state-dir")
        .arg(state.path())
        .args(["--bpf-pin-dir", &pins])
        .args(["--lab-socket", &lab_socket])
        .spawn()
        .expect("start ferrum-agent");
    struct Kill<'a>(&'a mut std::process::Child, String);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _agent = Kill(&mut agent, pins.clone());

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = run_plugin(None, &[("CNI_COMMAND", "STATUS")], &conf(&sock));
        if out.ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent never became ready: {:?}",
            out.stdout
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let pod_path = pod.path().display().to_string();
    let env = |cmd: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "roundtrip1".to_string()),
            ("CNI_NETNS", pod_path.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=rt".to_string(),
            ),
        ]
    };
    let run = |cmd: &'static str, stdin: &str| {
        let vars = env(cmd);
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_plugin(Some(&node.path()), &refs, stdin)
    };

    let add = run("ADD", &conf(&sock));
    assert!(add.ok, "ADD failed: {:?} {}", add.stdout, add.stderr);
    let address = add.stdout["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address")
        .to_string();
    assert!(address.ends_with("/32"), "{address}");
    assert_eq!(add.stdout["interfaces"][1]["sandbox"], pod_path.as_str());
    let (_, addrs) = pod.ip("-4 addr show dev eth0");
    assert!(addrs.contains(&address), "{addrs}");
    let (_, routes) = pod.ip("-4 route show");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let (_, neigh) = pod.ip("neigh show 169.254.1.1");
    assert!(neigh.contains("PERMANENT"), "{neigh}");

    let mut check_conf: Value = serde_json::from_str(&conf(&sock)).expect("conf");
    check_conf["prevResult"] = add.stdout.clone();
    let check = run("CHECK", &check_conf.to_string());
    assert!(check.ok, "CHECK failed: {:?}", check.stdout);

    let del = run("DEL", &conf(&sock));
    assert!(del.ok, "DEL failed: {:?}", del.stdout);
    let del_again = run("DEL", &conf(&sock));
    assert!(
        del_again.ok,
        "DEL must be idempotent: {:?}",
        del_again.stdout
    );
    assert!(!pod.ip("link show eth0").0, "pod interface gone");

    // DEL of a container nobody knows, whose netns is already gone.
    let gone = format!("/run/netns/fe-cni-gone-{}", std::process::id());
    let out = run_plugin(
        Some(&node.path()),
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "neverseen"),
            ("CNI_NETNS", &gone),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf(&sock),
    );
    assert!(out.ok, "{:?}", out.stdout);
}
