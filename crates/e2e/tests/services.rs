//! End-to-end tests of Services without kube-proxy: ClusterIP load balancing for TCP and UDP
//! across nodes, named targetPorts, immediate refusal without backends, hairpin, clusterIPs kept
//! on re-apply, and backends following pod removal. One lab shared by the assertions.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_datapath::netns::run_in_netns;
use ferrum_e2e::Lab;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(3);

fn tcp_read(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<String> {
    run_in_netns(netns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), TIMEOUT)
            .with_context(|| format!("connect {ip}:{port}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })?
}

/// The error kind of a TCP connect and how long it took to come back.
fn tcp_connect_error(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<(ErrorKind, Duration)> {
    run_in_netns(netns, move || -> Result<(ErrorKind, Duration)> {
        let start = Instant::now();
        match TcpStream::connect_timeout(&SocketAddr::from((ip, port)), TIMEOUT) {
            Ok(_) => bail!("connect to {ip}:{port} succeeded"),
            Err(e) => Ok((e.kind(), start.elapsed())),
        }
    })?
}

fn udp_ask(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<String> {
    udp_ask_with(netns, ip, port, b"hello".to_vec())
}

fn udp_ask_with(netns: &Path, ip: Ipv4Addr, port: u16, question: Vec<u8>) -> Result<String> {
    run_in_netns(netns, move || -> Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.connect((ip, port))?;
        s.send(&question)?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).context("no UDP answer")?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })?
}

/// Sends one datagram from a socket connected to ip:port, expecting no answer: the error
/// kind the socket reports (ConnectionRefused for an ICMP port unreachable).
fn udp_error(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<ErrorKind> {
    run_in_netns(netns, move || -> Result<ErrorKind> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.connect((ip, port))?;
        s.send(b"x")?;
        let mut buf = [0u8; 16];
        match s.recv(&mut buf) {
            Ok(_) => bail!("an answer from {ip}:{port}, which should have none"),
            Err(e) => Ok(e.kind()),
        }
    })?
}

/// Retries `f` until it succeeds (the datapath catches up with pod readiness asynchronously).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: gave up")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn tally(n: usize, mut f: impl FnMut() -> Result<String>) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(f()?).or_insert(0) += 1;
    }
    Ok(seen)
}

fn service_json(lab: &Lab, name: &str) -> Result<Value> {
    let list: Value = serde_json::from_str(&lab.ferrum_ok(&["get", "services", "-o", "json"])?)?;
    list["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|s| s["metadata"]["name"] == name)
                .cloned()
        })
        .with_context(|| format!("service {name} not listed"))
}

fn cluster_ip(lab: &Lab, name: &str) -> Result<Ipv4Addr> {
    service_json(lab, name)?["spec"]["clusterIP"]
        .as_str()
        .context("clusterIP")?
        .parse()
        .context("clusterIP")
}

/// A pod serving TCP 8080 (named `web`) and UDP 5353 (named `dns`).
fn backend(name: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: main\n    ports:\n\
         \x20   - {{name: web, containerPort: 8080}}\n\
         \x20   - {{name: dns, containerPort: 5353, protocol: UDP}}\n"
    )
}

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: dns, port: 53, targetPort: dns, protocol: UDP}\n";
const EMPTY: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  selector: {app: nobody}\n  ports:\n  - {name: t, port: 80}\n  - {name: u, port: 53, protocol: UDP}\n";

/// Selects the web backends on a UDP port none of them listens on.
const DEAF: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: deaf}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 55, targetPort: 5999, protocol: UDP}\n";

const ITP_LOCAL: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: itp}\nspec:\n  internalTrafficPolicy: Local\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n";

#[test]
fn cluster_ip_services_balance_reject_hairpin_and_follow_endpoints() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    let yaml = [
        backend("a", "node-0", "web"),
        backend("b", "node-1", "web"),
        backend("client", "node-0", "client"),
        WEB.to_string(),
        EMPTY.to_string(),
        DEAF.to_string(),
        ITP_LOCAL.to_string(),
    ]
    .join("---\n");
    lab.apply(&yaml)?;
    let vip = cluster_ip(&lab, "web")?;
    assert_eq!(
        vip.octets()[..2],
        [10, 0],
        "{vip} from the default service CIDR 10.0.0.0/16"
    );
    let client = lab.pod_netns("default", "client")?;

    // TCP through the ClusterIP reaches the local and the remote backend (named targetPort
    // resolved to 8080 on each pod); replies come back from the VIP.
    eventually("both TCP backends", || {
        let seen = tally(16, || tcp_read(&client, vip, 80))?;
        if seen.len() == 2 {
            Ok(())
        } else {
            bail!("only {seen:?}")
        }
    })?;
    let seen = tally(30, || tcp_read(&client, vip, 80))?;
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "30 connections: {seen:?}"
    );
    // UDP too (a connected socket only accepts answers from the VIP itself).
    let seen = tally(30, || udp_ask(&client, vip, 53))?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");
    // A datagram larger than the pod MTU leaves the client in fragments; the later ones carry
    // no ports and must follow the first to its backend, local or remote, or it never
    // reassembles.
    let seen = tally(20, || udp_ask_with(&client, vip, 53, vec![b'f'; 4000]))?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");

    // No backend: refused at once, not left to time out.
    let empty = cluster_ip(&lab, "empty")?;
    let (kind, took) = tcp_connect_error(&client, empty, 80)?;
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(took < TIMEOUT, "refused after {took:?}");
    assert_eq!(
        udp_error(&client, empty, 53)?,
        ErrorKind::ConnectionRefused,
        "ICMP port unreachable"
    );

    // A backend with nothing on the port answers ICMP port unreachable about the translated
    // datagram; the client's socket, connected to the VIP, gets it as the VIP's (local and
    // remote backends alike).
    let deaf = cluster_ip(&lab, "deaf")?;
    for _ in 0..6 {
        assert_eq!(
            udp_error(&client, deaf, 55)?,
            ErrorKind::ConnectionRefused,
            "the backend's port unreachable"
        );
    }

    // Hairpin: a backend reaching its own Service gets itself some of the time, and every
    // connection works.
    let a = lab.pod_netns("default", "a")?;
    let seen = tally(24, || tcp_read(&a, vip, 80))?;
    assert!(
        seen.contains_key("a"),
        "pod a never reached itself: {seen:?}"
    );

    // internalTrafficPolicy=Local: each client only reaches backends on its own node.
    let itp = cluster_ip(&lab, "itp")?;
    let b_ns = lab.pod_netns("default", "b")?;
    let from_0 = tally(10, || tcp_read(&client, itp, 80))?;
    assert_eq!(from_0.keys().collect::<Vec<_>>(), ["a"], "{from_0:?}");
    let from_1 = tally(10, || tcp_read(&b_ns, itp, 80))?;
    assert_eq!(from_1.keys().collect::<Vec<_>>(), ["b"], "{from_1:?}");

    // The compiled state explains itself: backends, hairpin, backend counts.
    let trace = lab.ferrum_ok(&[
        "service",
        "trace",
        "--from",
        "default/a",
        "--to",
        &format!("{vip}:80"),
    ])?;
    assert!(trace.contains("Service default/web:http"), "{trace}");
    assert!(trace.contains("candidate backends (2)"), "{trace}");
    assert!(trace.contains("hairpin"), "{trace}");
    let trace = lab.ferrum_ok(&[
        "service",
        "trace",
        "--from",
        "default/client",
        "--to",
        &format!("{empty}:53"),
        "--protocol",
        "udp",
    ])?;
    assert!(trace.contains("refused"), "{trace}");
    let wide = lab.ferrum_ok(&["get", "services", "-o", "wide"])?;
    let web_row = wide
        .lines()
        .find(|l| l.starts_with("web "))
        .context("web row")?;
    assert!(web_row.ends_with("2/2"), "{wide}");

    // Socket-level load balancing: a host process of node-1 (in the node's cgroup) reaches the
    // ClusterIP; its connect() goes straight to a backend.
    let cg = ferrum_lab::daemon::node_cgroup(&lab.paths, "node-1").context("cgroup v2")?;
    let script = format!(
        "echo $$ > {}/cgroup.procs && nc -w 3 {vip} 80",
        cg.display()
    );
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", lab.node_netns("node-1").display()))
        .args(["sh", "-c", &script])
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "a" || answer == "b",
        "node-1 host process got {answer:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Re-applying keeps the clusterIP.
    lab.apply(WEB)?;
    assert_eq!(cluster_ip(&lab, "web")?, vip);

    // Backends follow the endpoints: b goes, only a answers (flows to b were purged).
    let out = lab.ferrum(&["delete", "-f", "-"], Some(&backend("b", "node-1", "web")))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = tally(12, || tcp_read(&client, vip, 80))?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a"], "{seen:?}");
    Ok(())
}

fn node_ip(lab: &Lab, node: &str) -> Result<Ipv4Addr> {
    let status = lab.status()?;
    status["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == node))
        .and_then(|n| n["ip"].as_str())
        .with_context(|| format!("node {node} not in lab status"))?
        .parse()
        .context("node ip")
}

fn node_port(lab: &Lab, svc: &str) -> Result<u16> {
    let port = service_json(lab, svc)?["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .with_context(|| format!("service {svc} has no nodePort"))?;
    Ok(u16::try_from(port)?)
}

/// Accepts one connection on `port` inside `netns` (a pod), answers, and returns the peer.
fn accept_one(netns: &Path, port: u16) -> Result<std::thread::JoinHandle<Result<SocketAddr>>> {
    let listener = run_in_netns(netns, move || {
        std::net::TcpListener::bind(("0.0.0.0", port))
    })??;
    Ok(std::thread::spawn(move || -> Result<SocketAddr> {
        listener.set_nonblocking(false)?;
        let (mut s, peer) = listener.accept()?;
        std::io::Write::write_all(&mut s, b"seen\n")?;
        Ok(peer)
    }))
}

#[test]
fn node_ports_and_load_balancers_from_the_external_host_with_both_traffic_policies() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    let svc = |name: &str, policy: &str, app: &str, target: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  \
             externalTrafficPolicy: {policy}\n  selector: {{app: {app}}}\n  ports:\n  - {{port: 80, targetPort: {target}}}\n"
        )
    };
    let yaml = [
        backend("a", "node-0", "web"),
        backend("b", "node-1", "web"),
        svc("cluster", "Cluster", "web", 8080),
        svc("local", "Local", "web", 9000),
        svc("lb", "Cluster", "web", 8080).replace("NodePort", "LoadBalancer"),
        svc("dns-tcp", "Cluster", "web", 8080)
            .replace(
                "type: NodePort",
                "type: LoadBalancer\n  loadBalancerIP: 198.51.100.53",
            )
            .replace("port: 80,", "port: 53,"),
        svc("dns-udp", "Cluster", "web", 5353)
            .replace(
                "type: NodePort",
                "type: LoadBalancer\n  loadBalancerIP: 198.51.100.53",
            )
            .replace("port: 80,", "port: 53, protocol: UDP,"),
    ]
    .join("---\n");
    lab.apply(&yaml)?;
    let ext = lab.external_netns();
    let (n0, n1) = (node_ip(&lab, "node-0")?, node_ip(&lab, "node-1")?);
    let cluster_port = node_port(&lab, "cluster")?;
    assert!((30000..=32767).contains(&cluster_port));

    // Cluster policy: any node forwards to any backend (masqueraded), both backends reached.
    eventually("node port answers", || tcp_read(&ext, n0, cluster_port))?;
    let mut seen = BTreeMap::new();
    for node in [n0, n1] {
        for _ in 0..12 {
            *seen.entry(tcp_read(&ext, node, cluster_port)?).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");

    // LoadBalancer: an address from the pool, routed by the fabric to the nodes.
    let lb_ip: Ipv4Addr = service_json(&lab, "lb")?["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .context("lb ingress ip")?
        .parse()?;
    assert_eq!(
        lb_ip.octets()[..3],
        [198, 51, 100],
        "from the default --lb-pool"
    );
    eventually("load balancer answers", || tcp_read(&ext, lb_ip, 80))?;
    let seen = tally(20, || tcp_read(&ext, lb_ip, 80))?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["a", "b"], "{seen:?}");
    // Two Services on one address and port, one TCP and one UDP: both work.
    let dns: Ipv4Addr = "198.51.100.53".parse()?;
    let tcp = eventually("53/TCP on the shared address", || tcp_read(&ext, dns, 53))?;
    assert!(tcp == "a" || tcp == "b", "{tcp}");
    let udp = eventually("53/UDP on the shared address", || udp_ask(&ext, dns, 53))?;
    assert!(udp == "a" || udp == "b", "{udp}");

    // Local policy: the backend sees the external host's own address.
    let local_port = node_port(&lab, "local")?;
    let a = lab.pod_netns("default", "a")?;
    let b = lab.pod_netns("default", "b")?;
    let peer = accept_one(&a, 9000)?;
    let peer_b = accept_one(&b, 9000)?;
    assert_eq!(
        eventually("local node port", || tcp_read(&ext, n0, local_port))?,
        "seen"
    );
    let peer = peer
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    assert_eq!(
        peer.ip().to_string(),
        lab.status()?["external"]["ip"]
            .as_str()
            .context("external ip")?,
        "client source preserved"
    );
    // Through node-1 it reaches node-1's own backend only (b), again with the real source.
    assert_eq!(tcp_read(&ext, n1, local_port)?, "seen");
    let peer_b = peer_b
        .join()
        .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
    assert_eq!(peer_b.ip(), peer.ip());

    // Local policy with no backend on the node: refused at once.
    let out = lab.ferrum(&["delete", "-f", "-"], Some(&backend("b", "node-1", "web")))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (kind, _) = eventually("refused on node-1", || {
        let r = tcp_connect_error(&ext, n1, local_port)?;
        if r.0 == ErrorKind::ConnectionRefused {
            Ok(r)
        } else {
            bail!("{r:?}")
        }
    })?;
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    Ok(())
}

#[test]
fn affinity_maglev_selectorless_headless_and_source_ranges() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    let svc = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: web}}\n  \
             ports:\n  - {{port: 80, targetPort: 8080}}\n{extra}"
        )
    };
    let yaml = [
        backend("a", "node-0", "web"),
        backend("b", "node-1", "web"),
        backend("client", "node-0", "client"),
        svc("sticky", "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n"),
        svc("maglev", "").replace("metadata: {name: maglev}", "metadata: {name: maglev, annotations: {ferrum.io/lb-algorithm: maglev}}"),
        svc("headless", "  clusterIP: None\n"),
        svc("open", "  type: LoadBalancer\n  loadBalancerSourceRanges: [203.0.113.0/24]\n"),
        svc("closed", "  type: LoadBalancer\n  loadBalancerSourceRanges: [192.0.2.0/24]\n"),
    ]
    .join("---\n");
    lab.apply(&yaml)?;
    let client = lab.pod_netns("default", "client")?;

    // sessionAffinity ClientIP: every connection of the client lands on one backend.
    let sticky = cluster_ip(&lab, "sticky")?;
    eventually("sticky answers", || tcp_read(&client, sticky, 80))?;
    let seen = tally(16, || tcp_read(&client, sticky, 80))?;
    assert_eq!(seen.len(), 1, "{seen:?}");

    // Maglev (chosen per Service): spreads flows over both backends.
    let maglev = cluster_ip(&lab, "maglev")?;
    eventually("maglev reaches both", || {
        let seen = tally(16, || tcp_read(&client, maglev, 80))?;
        if seen.len() == 2 {
            Ok(())
        } else {
            bail!("{seen:?}")
        }
    })?;

    // Headless: no virtual IP.
    assert_eq!(service_json(&lab, "headless")?["spec"]["clusterIP"], "None");

    // A Service without selector, backed by a hand-written EndpointSlice.
    let a_ip = lab.pod_ip("default", "a")?;
    lab.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: manual}}\nspec:\n  ports:\n  - {{port: 80}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: manual-1\n  labels: {{kubernetes.io/service-name: manual}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [\"{a_ip}\"]}}]\n"
    ))?;
    let manual = cluster_ip(&lab, "manual")?;
    assert_eq!(
        eventually("manual slice", || tcp_read(&client, manual, 80))?,
        "a"
    );

    // loadBalancerSourceRanges: the external host is admitted by one Service, not the other.
    let ext = lab.external_netns();
    let lb_ip = |name: &str| -> Result<Ipv4Addr> {
        Ok(
            service_json(&lab, name)?["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .context("ingress ip")?
                .parse()?,
        )
    };
    let open = lb_ip("open")?;
    eventually("open LB", || tcp_read(&ext, open, 80))?;
    let closed = lb_ip("closed")?;
    let refused = run_in_netns(&ext, move || {
        TcpStream::connect_timeout(&SocketAddr::from((closed, 80)), Duration::from_secs(1)).is_err()
    })?;
    assert!(refused, "a client outside loadBalancerSourceRanges got in");
    Ok(())
}
