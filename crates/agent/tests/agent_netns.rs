//! The agent on the real kernel: started in a throwaway network namespace with its own pin
//! directory, fed the cluster through an in-process channel Source, driven over its unix
//! socket with agent-API requests; map, pin and route contents are checked directly.
//! Needs root, bpffs and the kernel features in shared/notes/machine.md.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use clap::Parser;
use ferrum_agent::config::Config;
use ferrum_agent_api::{AttachmentKey, ErrorKind, Reply, Request, Response, host_ifname};
use ferrum_datapath::link::Netlink;
use ferrum_datapath::netns::run_in_netns;
use ferrum_model::{AgentReport, Object, Source, SourceError, WatchEvent};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A real in-process Source: the test is the control plane's event stream.
struct ChannelSource {
    events: Receiver<WatchEvent>,
    reports: Sender<AgentReport>,
}

impl Source for ChannelSource {
    fn next_event(&mut self) -> Result<WatchEvent, SourceError> {
        self.events
            .recv()
            .map_err(|_| SourceError::Disconnected("test ended".into()))
    }
    fn report(&mut self, report: &AgentReport) -> Result<(), SourceError> {
        self.reports
            .send(report.clone())
            .map_err(|_| SourceError::Disconnected("test ended".into()))
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node namespace with an addressed eth0, and a pin directory; both removed on drop.
struct TestNode {
    netns: String,
    pin_dir: PathBuf,
}

impl TestNode {
    fn new(tag: &str) -> Self {
        let netns = format!("fa-{tag}-{}", std::process::id());
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/ferrum-test-{tag}-{}",
            std::process::id()
        ));
        let node = TestNode { netns, pin_dir };
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
        let _ = ferrum_datapath::bpf::remove_pins(&self.pin_dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn node(name: &str, addr: &str, cidr: &str) -> WatchEvent {
    WatchEvent::Upsert {
        object: Object::Node(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    address: addr.into(),
                    type_: "InternalIP".into(),
                }]),
                ..Default::default()
            }),
        }),
    }
}

fn request(socket: &Path, req: &Request) -> Result<Reply, ferrum_agent_api::AgentError> {
    let mut s = UnixStream::connect(socket).expect("connect to the agent");
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    serde_json::from_str::<Response>(&out).unwrap().into()
}

fn wait_report(reports: &Receiver<AgentReport>, revision: u64) -> AgentReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = reports.recv_timeout(left).expect("agent report");
        if r.realized_revision >= revision {
            return r;
        }
    }
}

fn start_agent(
    test: &TestNode,
    dir: &Path,
    socket: &Path,
) -> (
    ferrum_agent::AgentHandle,
    Sender<WatchEvent>,
    Receiver<AgentReport>,
) {
    let config = Config::try_parse_from([
        "ferrum-agent",
        "--node-name",
        "node-a",
        "--socket",
        socket.to_str().unwrap(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
        "--bpf-pin-dir",
        test.pin_dir.to_str().unwrap(),
        "--observe-socket",
        dir.join("run/observe.sock").to_str().unwrap(),
    ])
    .unwrap();
    let (event_tx, events) = channel();
    let (reports, report_rx) = channel();
    let source = Box::new(ChannelSource { events, reports });
    // Threads started inside inherit the namespace of the thread that starts them.
    let handle = run_in_netns(&test.path(), move || ferrum_agent::start(&config, source))
        .expect("enter the test netns")
        .expect("agent starts");
    (handle, event_tx, report_rx)
}

#[test]
fn agent_serves_cni_api_and_realizes_nodes_in_the_kernel() {
    let test = TestNode::new("api");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/agent.sock");
    let (agent, events, reports) = start_agent(&test, dir.path(), &socket);
    assert_eq!(agent.node_ip, Ipv4Addr::new(10, 224, 0, 4));

    let key = AttachmentKey {
        container_id: "c0ffee".into(),
        ifname: "eth0".into(),
    };
    let allocate = Request::Allocate {
        key: key.clone(),
        netns: "/run/netns/pod".into(),
        pod: None,
        network: "ferrum".into(),
    };
    // No block yet: not ready, try again later.
    assert_eq!(
        request(&socket, &allocate).unwrap_err().kind,
        ErrorKind::NotReady
    );

    events
        .send(node("node-a", "10.224.0.4", "10.244.1.0/24"))
        .unwrap();
    events
        .send(node("node-b", "10.224.0.5", "10.244.2.0/24"))
        .unwrap();
    events.send(WatchEvent::Synced { revision: 7 }).unwrap();
    let report = wait_report(&reports, 7);
    assert!(report.ready, "{report:?}");
    {
        let st = agent.state.lock().unwrap();
        let cache = st.dataplane.datapath.ipcache().unwrap();
        let prefixes: Vec<String> = cache.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            prefixes,
            [
                "10.224.0.4/32",
                "10.224.0.5/32",
                "10.244.1.0/24",
                "10.244.2.0/24"
            ],
            "{cache:?}"
        );
    }
    // The overlay device and the cluster route exist in the node netns.
    let routes = ip(&["-n", &test.netns, "route", "show", "10.244.0.0/16"]);
    assert!(routes.contains("dev ferrum_vxlan"), "{routes}");

    let Reply::Allocated(alloc) = request(&socket, &allocate).unwrap() else {
        panic!("allocate did not allocate")
    };
    assert_eq!(alloc.ip, Ipv4Addr::new(10, 244, 1, 1));
    assert_eq!(alloc.mtu, 1450);

    // The plugin's part: the veth pair, host side named for the attachment.
    let host = host_ifname(&key);
    ip(&[
        "-n",
        &test.netns,
        "link",
        "add",
        &host,
        "type",
        "veth",
        "peer",
        "name",
        "podside",
    ]);
    ip(&["-n", &test.netns, "link", "set", &host, "up"]);
    ip(&["-n", &test.netns, "link", "set", "podside", "up"]);
    let (host_link, pod_link) = run_in_netns(&test.path(), || {
        let nl = Netlink::connect().unwrap();
        (
            nl.link(&host).unwrap().unwrap(),
            nl.link("podside").unwrap().unwrap(),
        )
    })
    .unwrap();
    let attach = Request::Attach {
        key: key.clone(),
        host_ifname: host.clone(),
        host_ifindex: host_link.index,
        host_mac: host_link.mac,
        pod_mac: pod_link.mac,
    };
    assert_eq!(request(&socket, &attach).unwrap(), Reply::Done);
    {
        let st = agent.state.lock().unwrap();
        let eps = st.dataplane.datapath.endpoints().unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].0, alloc.ip);
        assert_eq!(eps[0].1.ifindex, host_link.index);
        assert_eq!(eps[0].1.pod_mac, pod_link.mac);
        assert!(
            st.dataplane
                .datapath
                .pinned_pod_links()
                .unwrap()
                .contains(&host)
        );
    }
    // The host stack reaches the pod through the node's host device, whose egress program
    // (one tcx link per node, not per pod) hands packets to the pod's veth.
    let route = ip(&["-n", &test.netns, "route", "show", "10.244.1.1/32"]);
    assert!(
        route.contains("dev ferrum_host") && route.contains("src 10.224.0.4"),
        "{route}"
    );
    assert_eq!(
        request(&socket, &Request::Check { key: key.clone() }).unwrap(),
        Reply::Present {
            ip: alloc.ip,
            host_ifname: host.clone()
        }
    );
    assert_eq!(
        request(&socket, &Request::Status).unwrap(),
        Reply::Ready { free_ips: 249 }
    );

    // A node leaves: its ipcache entries go, the others stay.
    events
        .send(WatchEvent::Delete {
            object: match node("node-b", "10.224.0.5", "10.244.2.0/24") {
                WatchEvent::Upsert { object } => object,
                _ => unreachable!(),
            },
        })
        .unwrap();
    events.send(WatchEvent::Synced { revision: 8 }).unwrap();
    wait_report(&reports, 8);
    assert_eq!(
        agent
            .state
            .lock()
            .unwrap()
            .dataplane
            .datapath
            .ipcache()
            .unwrap()
            .len(),
        2
    );

    assert_eq!(
        request(&socket, &Request::Release { key: key.clone() }).unwrap(),
        Reply::Done
    );
    {
        let st = agent.state.lock().unwrap();
        assert!(st.dataplane.datapath.endpoints().unwrap().is_empty());
        assert!(
            !st.dataplane
                .datapath
                .pinned_pod_links()
                .unwrap()
                .contains(&host)
        );
        assert_eq!(st.store.pool().used(), 0);
    }
    let route = ip(&["-n", &test.netns, "route", "show", "10.244.1.1/32"]);
    assert!(
        route.trim().is_empty(),
        "the released pod's route remains ({route}); Netlink::delete_route must match a \
         scope-link route (scope RT_SCOPE_NOWHERE in the delete request, as `ip route del` does)"
    );
    // Release is idempotent.
    assert_eq!(
        request(&socket, &Request::Release { key }).unwrap(),
        Reply::Done
    );
}
