//! New-connection rate and latency to a Service VIP: Ferrum's eBPF load balancer against
//! kube-proxy-style iptables and nftables rule sets of the same size, built in the same run.
//! Root; everything lives in three network namespaces made (and removed) by the benchmark:
//! a client "pod", a server "pod" and the "node" between them (pods are wired exactly as
//! Ferrum wires them: /32, gateway 169.254.1.1 as a permanent neighbour).
//!
//! Run: `cargo run --release -p ferrum-datapath --example conn_bench [seconds]`

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_datapath::bpf::{
    Datapath, EndpointInfo, LbBackend, LbFrontendKey, LbService, NodeConfig,
};
use ferrum_datapath::netns::run_in_netns;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 6);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ferrum,
    Iptables,
    Nftables,
}

fn sh(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {args:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + 1 + i)
}

struct Topology {
    node: String,
    client: String,
    server: String,
    pins: PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = ferrum_datapath::bpf::remove_pins(&self.pins);
        for ns in [&self.node, &self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = sh(&["ip", "-n", ns, "-o", "link", "show", dev], None)?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .context("mac")
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

fn topology(tag: &str) -> Result<Topology> {
    let id = std::process::id();
    let t = Topology {
        node: format!("fe-cb{id}-{tag}-n"),
        client: format!("fe-cb{id}-{tag}-c"),
        server: format!("fe-cb{id}-{tag}-s"),
        pins: PathBuf::from(format!("/sys/fs/bpf/fe-cb{id}-{tag}")),
    };
    for ns in [&t.node, &t.client, &t.server] {
        sh(&["ip", "netns", "add", ns], None)?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"], None)?;
    }
    sh(
        &[
            "ip",
            "netns",
            "exec",
            &t.node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
        None,
    )?;
    for (pod, host, ip) in [(&t.client, "vc", CLIENT), (&t.server, "vs", SERVER)] {
        sh(
            &[
                "ip", "-n", &t.node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", pod,
            ],
            None,
        )?;
        sh(&["ip", "-n", &t.node, "link", "set", host, "up"], None)?;
        sh(
            &[
                "ip",
                "-n",
                pod,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "eth0",
            ],
            None,
        )?;
        sh(&["ip", "-n", pod, "link", "set", "eth0", "up"], None)?;
        let hmac = mac_of(&t.node, host)?;
        sh(
            &[
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
            None,
        )?;
        sh(
            &[
                "ip",
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
            ],
            None,
        )?;
        sh(
            &[
                "ip",
                "-n",
                pod,
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                &hmac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
            None,
        )?;
        sh(
            &[
                "ip",
                "-n",
                &t.node,
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                host,
            ],
            None,
        )?;
    }
    Ok(t)
}

fn install(t: &Topology, mode: Mode, n: u32) -> Result<Option<Datapath>> {
    match mode {
        Mode::Iptables => {
            let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
            for i in 0..n {
                rules += &format!(":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]\n");
            }
            rules += "-A PREROUTING -j KUBE-SERVICES\n";
            for i in 0..n {
                rules += &format!(
                    "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n\
                     -A KUBE-SVC-{i} -j KUBE-SEP-{i}\n\
                     -A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {SERVER}:8080\n",
                    vip(i)
                );
            }
            rules += "COMMIT\n";
            sh(
                &["ip", "netns", "exec", &t.node, "iptables-restore"],
                Some(&rules),
            )?;
            Ok(None)
        }
        Mode::Nftables => {
            let mut s = String::from("table ip kp {\n");
            for i in 0..n {
                s += &format!("  chain svc-{i} {{ meta l4proto tcp dnat to {SERVER}:8080; }}\n");
            }
            s += "  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {\n";
            for i in 0..n {
                s += &format!("      {} . tcp . 80 : goto svc-{i},\n", vip(i));
            }
            s += "    }\n  }\n  chain prerouting {\n    type nat hook prerouting priority dstnat;\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n}\n";
            sh(
                &["ip", "netns", "exec", &t.node, "nft", "-f", "-"],
                Some(&s),
            )?;
            Ok(None)
        }
        Mode::Ferrum => {
            let node = t.node.clone();
            let pins = t.pins.clone();
            let (cmac, smac) = (mac_of(&t.client, "eth0")?, mac_of(&t.server, "eth0")?);
            let (vcmac, vsmac) = (mac_of(&t.node, "vc")?, mac_of(&t.node, "vs")?);
            let path = PathBuf::from(format!("/run/netns/{node}"));
            let dp = run_in_netns(&path, move || -> Result<Datapath> {
                let mut dp = Datapath::open(&pins)?;
                let vc = nix::net::if_::if_nametoindex("vc")?;
                let vs = nix::net::if_::if_nametoindex("vs")?;
                dp.set_config(&NodeConfig {
                    node_ip: Ipv4Addr::new(10, 224, 0, 10),
                    cluster_cidr: "10.1.0.0/16".parse()?,
                    local_block: "10.1.0.0/24".parse()?,
                    overlay_ifindex: 0,
                    uplink_ifindex: 0,
                    vni: 2,
                    nat_ports: 49152..=65535,
                    trace: false,
                })?;
                for (ip, ifindex, pod, host, dev) in [
                    (CLIENT, vc, &cmac, &vcmac, "vc"),
                    (SERVER, vs, &smac, &vsmac, "vs"),
                ] {
                    dp.upsert_endpoint(
                        ip,
                        &EndpointInfo {
                            ifindex,
                            pod_mac: parse_mac(pod)?,
                            host_mac: parse_mac(host)?,
                        },
                    )?;
                    dp.attach_pod(dev)?;
                }
                for i in 0..n {
                    let id = i + 1;
                    dp.upsert_lb_backend(
                        id,
                        1,
                        &LbBackend {
                            addr: SERVER,
                            port: 8080,
                        },
                    )?;
                    dp.upsert_lb_service(
                        &LbFrontendKey {
                            addr: vip(i),
                            port: 80,
                            proto: 6,
                            scope: 0,
                        },
                        &LbService {
                            id,
                            count: 1,
                            ..LbService::default()
                        },
                    )?;
                }
                Ok(dp)
            })??;
            Ok(Some(dp))
        }
    }
}

/// Connects and closes (RST, so no TIME_WAIT runs out the ports) for `secs`; returns
/// (connections per second, p50 and p99 connect latency).
/// A TCP socket bound to `addr:port` with SO_REUSEADDR (in the calling thread's netns).
fn bound_tcp_socket(addr: Ipv4Addr, port: u16) -> Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(addr, port)),
    )?;
    Ok(fd)
}

fn measure(t: &Topology, target: Ipv4Addr, secs: f64) -> Result<(f64, Duration, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let server_ns = PathBuf::from(format!("/run/netns/{}", t.server));
    // A deep listen queue: a server thread descheduled for a few milliseconds on a busy
    // machine must not make the kernel drop SYNs (each costs the client a 1 s retransmit).
    let listener = run_in_netns(&server_ns, || -> Result<TcpListener> {
        let fd = bound_tcp_socket(SERVER, 8080)?;
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(4096)?)?;
        Ok(TcpListener::from(fd))
    })??;
    // A blocking accept that wakes up now and then to see `stop` (accept honours
    // SO_RCVTIMEO). Polling with sleeps instead made the server slower than the clients a
    // fast datapath produces: the listen queue overflowed, the kernel dropped SYNs and every
    // overflow cost a 1 s SYN retransmit, which the benchmark then blamed on the datapath.
    nix::sys::socket::setsockopt(
        &listener,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )?;
    let s2 = stop.clone();
    let server = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            // Err: the receive timeout passed; look at `stop` again.
            if let Ok((mut s, _)) = listener.accept() {
                // Wait for the client's RST instead of closing first: a server-side
                // TIME_WAIT would collide with the client's quickly reused ports and
                // cost 1 s SYN retransmits in every mode.
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
            }
        }
    });
    let client_ns = PathBuf::from(format!("/run/netns/{}", t.client));
    let result = run_in_netns(&client_ns, move || -> Result<(f64, Duration, Duration)> {
        let addr = SocketAddr::from((target, 80));
        let mut lat = Vec::new();
        let start = Instant::now();
        let mut port: u16 = 10_000;
        while start.elapsed().as_secs_f64() < secs {
            use nix::sys::socket::{SockaddrIn, connect};
            // Source ports in sequence: a 4-tuple comes back only after 50,000 connections,
            // so no new SYN meets the remains of an earlier connection (which would cost a
            // 1 s retransmit and measure TCP, not the load balancer).
            port = if port >= 60_000 { 10_000 } else { port + 1 };
            let t0 = Instant::now();
            let fd = bound_tcp_socket(CLIENT, port)?;
            connect(
                fd.as_raw_fd(),
                &SockaddrIn::from(std::net::SocketAddrV4::new(target, 80)),
            )
            .with_context(|| format!("connect {addr}"))?;
            let s = TcpStream::from(fd);
            lat.push(t0.elapsed());
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            drop(s);
        }
        let total = start.elapsed().as_secs_f64();
        lat.sort();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
        // A lost SYN costs a 1 s retransmit in every mode (about one in several thousand
        // connections here); report the rate with that time taken out as well.
        let stalls: Vec<&Duration> = lat
            .iter()
            .filter(|l| **l > Duration::from_millis(200))
            .collect();
        let stalled: f64 = stalls.iter().map(|d| d.as_secs_f64()).sum();
        eprintln!(
            "    {} connections, {} SYN retransmit stalls ({stalled:.2} s); rate without them: {:.0}/s",
            lat.len(),
            stalls.len(),
            lat.len() as f64 / (total - stalled)
        );
        Ok((lat.len() as f64 / total, pct(0.5), pct(0.99)))
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    result
}

fn main() -> Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3.0);
    println!("services  mode      conn/s    p50_us  p99_us   (target: the last Service)");
    for n in [10u32, 10_000] {
        for mode in [Mode::Iptables, Mode::Nftables, Mode::Ferrum] {
            let tag = format!("{}{}", &format!("{mode:?}")[..1].to_lowercase(), n);
            let t = topology(&tag)?;
            let _dp = install(&t, mode, n)?;
            let target = vip(n - 1);
            let (rate, p50, p99) = measure(&t, target, secs)?;
            println!(
                "{n:>8}  {:<8}  {rate:>8.0}  {:>6}  {:>6}",
                format!("{mode:?}").to_lowercase(),
                p50.as_micros(),
                p99.as_micros()
            );
        }
    }
    Ok(())
}
