//! End-to-end tests of the foundation: pods talking on one node, across nodes (VXLAN), to the
//! external host (SNAT to the node IP), node <-> pods, the datapath outliving its agent, bad
//! input, and `lab down` leaving nothing behind. Each test builds its own lab.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_datapath::netns::run_in_netns;
use ferrum_e2e::{Lab, pod_yaml};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Connects from inside `netns` to ip:port and returns what the server wrote.
fn tcp_read(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<String> {
    run_in_netns(netns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, port)), TIMEOUT)
            .with_context(|| format!("connect {ip}:{port}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}

/// Sends one datagram from inside `netns` and returns the answer.
fn udp_ask(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<String> {
    run_in_netns(netns, move || -> Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send_to(b"hello", (ip, port))?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).context("no UDP answer")?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

/// (received, sent) packets of a node's VXLAN device.
fn vxlan_device_packets(lab: &Lab, node: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &lab.paths.node_netns(node),
            "-s",
            "-j",
            "link",
            "show",
            "ferrum_vxlan",
        ])
        .output()
        .context("ip -s link show ferrum_vxlan")?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let stats = &links[0]["stats64"];
    Ok((
        stats["rx"]["packets"].as_u64().context("rx packets")?,
        stats["tx"]["packets"].as_u64().context("tx packets")?,
    ))
}

#[test]
fn pods_reach_each_other_on_one_node_and_across_nodes() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    let yaml = [
        pod_yaml("default", "a", "node-0"),
        pod_yaml("default", "b", "node-0"),
        pod_yaml("default", "c", "node-1"),
    ]
    .join("---\n");
    lab.apply(&yaml)?;
    let (a, b, c) = (
        lab.pod_ip("default", "a")?,
        lab.pod_ip("default", "b")?,
        lab.pod_ip("default", "c")?,
    );
    assert_ne!(a, b);
    let a_ns = lab.pod_netns("default", "a")?;
    let c_ns = lab.pod_netns("default", "c")?;

    // Same node: redirected veth to veth.
    assert_eq!(tcp_read(&a_ns, b, 80)?, "b\n");
    assert_eq!(udp_ask(&a_ns, b, 53)?.trim(), "b");
    // Across nodes: VXLAN, both directions, wrapped and unwrapped by the eBPF programs: the
    // VXLAN devices carry none of it.
    let devices_before = [
        vxlan_device_packets(&lab, "node-0")?,
        vxlan_device_packets(&lab, "node-1")?,
    ];
    assert_eq!(tcp_read(&a_ns, c, 80)?, "c\n");
    assert_eq!(tcp_read(&c_ns, a, 80)?, "a\n");
    assert_eq!(udp_ask(&c_ns, b, 53)?.trim(), "b");
    assert_eq!(
        [
            vxlan_device_packets(&lab, "node-0")?,
            vxlan_device_packets(&lab, "node-1")?,
        ],
        devices_before,
        "pod traffic went through a VXLAN device"
    );
    // Node to its own pods and to pods on other nodes.
    assert_eq!(tcp_read(&lab.node_netns("node-0"), a, 80)?, "a\n");
    assert_eq!(tcp_read(&lab.node_netns("node-0"), c, 80)?, "c\n");
    assert_eq!(tcp_read(&lab.node_netns("node-1"), b, 80)?, "b\n");
    // `ferrum exec` runs the command in the pod's namespace and passes its exit code through.
    let (code, out) = lab.exec("default", "a", &["nc", "-w", "3", &c.to_string(), "80"])?;
    assert_eq!((code, out.as_str()), (0, "c\n"));
    let (code, _) = lab.exec("default", "a", &["sh", "-c", "exit 7"])?;
    assert_eq!(code, 7);
    Ok(())
}

#[test]
fn pod_traffic_to_the_external_host_leaves_with_the_node_ip() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(&[pod_yaml("default", "a", "node-1")].join("---\n"))?;
    let a_ns = lab.pod_netns("default", "a")?;
    let ext_ip: Ipv4Addr = lab.status()?["external"]["ip"]
        .as_str()
        .context("external ip")?
        .parse()?;

    // A server on the external host that reports the source address it sees.
    let listener = run_in_netns(&lab.external_netns(), move || {
        TcpListener::bind((ext_ip, 8080))
    })??;
    let server = std::thread::spawn(move || -> Result<SocketAddr> {
        let (mut s, peer) = listener.accept()?;
        s.write_all(b"external\n")?;
        Ok(peer)
    });
    assert_eq!(tcp_read(&a_ns, ext_ip, 8080)?, "external\n");
    let peer = server.join().expect("server thread")?;
    assert_eq!(peer.ip(), std::net::IpAddr::V4(lab.node_ip("node-1")?));
    assert_ne!(peer.ip(), std::net::IpAddr::V4(lab.pod_ip("default", "a")?));

    // UDP too: an echo from the external host comes back to the pod through reverse SNAT.
    let udp = run_in_netns(&lab.external_netns(), move || {
        UdpSocket::bind((ext_ip, 5353))
    })??;
    let echo = std::thread::spawn(move || -> Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, peer) = udp.recv_from(&mut buf)?;
        udp.send_to(&buf[..n], peer)?;
        Ok(peer)
    });
    assert_eq!(udp_ask(&a_ns, ext_ip, 5353)?, "hello");
    let peer = echo.join().expect("echo thread")?;
    assert_eq!(peer.ip(), std::net::IpAddr::V4(lab.node_ip("node-1")?));
    Ok(())
}

/// Path MTU discovery through the SNAT: the fabric's link to the external host gets a smaller
/// MTU than the pod's, so the fabric answers the pod's full-size segments with ICMP
/// "fragmentation needed" addressed to the node IP. Only if the node hands that error back to
/// the pod (quote translated to the pod's address and port) does the pod's TCP shrink its
/// segments; otherwise the upload stalls in a black hole.
#[test]
fn path_mtu_discovery_works_through_the_snat() -> Result<()> {
    const UPLOAD: usize = 512 * 1024;
    let lab = Lab::up(1, &[])?;
    lab.apply(&pod_yaml("default", "a", "node-0"))?;
    let a_ns = lab.pod_netns("default", "a")?;
    let ext_ip: Ipv4Addr = lab.status()?["external"]["ip"]
        .as_str()
        .context("external ip")?
        .parse()?;
    let fabric = lab.paths.fabric_netns();
    let out = std::process::Command::new("ip")
        .args(["-n", &fabric, "link", "set", "ext", "mtu", "1300"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "lowering the fabric's MTU toward the external host: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The external host counts what it receives and answers with the count.
    let listener = run_in_netns(&lab.external_netns(), move || {
        TcpListener::bind((ext_ip, 8081))
    })??;
    let server = std::thread::spawn(move || -> Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        s.write_all(total.to_string().as_bytes())?;
        Ok(total)
    });
    let answer = run_in_netns(&a_ns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ext_ip, 8081)), TIMEOUT)?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&vec![7u8; UPLOAD])
            .context("the upload stalled: no path MTU learned through the SNAT")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .context("no answer: the upload never completed")?;
        Ok(out)
    })??;
    assert_eq!(answer, UPLOAD.to_string());
    assert_eq!(server.join().expect("server thread")?, UPLOAD);
    Ok(())
}

/// The node's agent pid; None while no agent runs (between a kill and the restart).
fn agent_pid(lab: &Lab, node: &str) -> Result<Option<i32>> {
    let status = lab.status()?;
    let n = status["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == node).cloned())
        .context("node in status")?;
    Ok(n["agentPid"].as_i64().map(|p| p as i32))
}

#[test]
fn connections_survive_an_agent_kill_and_the_restarted_agent_serves_new_pods() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(
        &[
            pod_yaml("default", "a", "node-0"),
            pod_yaml("default", "b", "node-1"),
        ]
        .join("---\n"),
    )?;
    let b_ip = lab.pod_ip("default", "b")?;
    let a_ns = lab.pod_netns("default", "a")?;
    let b_ns = lab.pod_netns("default", "b")?;

    // A long-lived TCP connection a -> b (an echo server the test runs in b's namespace).
    let listener = run_in_netns(&b_ns, move || TcpListener::bind((b_ip, 7000)))??;
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let mut conn = run_in_netns(&a_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((b_ip, 7000)), TIMEOUT)
    })??;
    conn.set_read_timeout(Some(TIMEOUT))?;
    let mut roundtrip = |msg: &[u8]| -> Result<()> {
        conn.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf)?;
        if buf != msg {
            bail!("echo mismatch");
        }
        Ok(())
    };
    roundtrip(b"before")?;

    let old = [
        agent_pid(&lab, "node-0")?.context("node-0 agent")?,
        agent_pid(&lab, "node-1")?.context("node-1 agent")?,
    ];
    for pid in old {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    // With both agents dead the datapath keeps forwarding.
    roundtrip(b"agents down")?;

    // The lab restarts agents (as a DaemonSet would); wait for new ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = [agent_pid(&lab, "node-0")?, agent_pid(&lab, "node-1")?];
        let restarted = now
            .iter()
            .zip(old)
            .all(|(now, old)| now.is_some_and(|p| p != old));
        let ready = lab.status()?["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["ready"] == true));
        if restarted && ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("agents were not restarted: {now:?} (killed {old:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    roundtrip(b"agents back")?;

    // New pods work with the restarted agents, on both nodes, and reach the old ones.
    lab.apply(
        &[
            pod_yaml("default", "c", "node-0"),
            pod_yaml("default", "d", "node-1"),
        ]
        .join("---\n"),
    )?;
    let c_ns = lab.pod_netns("default", "c")?;
    assert_eq!(tcp_read(&c_ns, lab.pod_ip("default", "d")?, 80)?, "d\n");
    assert_eq!(tcp_read(&c_ns, lab.pod_ip("default", "a")?, 80)?, "a\n");
    assert_eq!(tcp_read(&a_ns, lab.pod_ip("default", "c")?, 80)?, "c\n");
    roundtrip(b"still")?;
    Ok(())
}

#[test]
fn bad_input_is_refused_and_nothing_is_half_created() -> Result<()> {
    let lab = Lab::up(1, &[])?;
    // Not Kubernetes YAML at all.
    let out = lab.ferrum(&["apply", "-f", "-"], Some("this: [is not"))?;
    assert!(!out.status.success());
    // An unknown kind in a batch with a valid pod: the valid pod is not created either.
    let batch = format!(
        "{}---\napiVersion: v1\nkind: Gadget\nmetadata:\n  name: x\n",
        pod_yaml("default", "ok", "node-0")
    );
    let out = lab.ferrum(&["apply", "-f", "-"], Some(&batch))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Gadget"), "error should name the kind: {err}");
    // A pod pinned to a node that does not exist.
    let out = lab.ferrum(
        &["apply", "-f", "-"],
        Some(&pod_yaml("default", "lost", "node-9")),
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node-9"), "error should name the node: {err}");
    let pods = lab.ferrum_ok(&["get", "pods", "-A", "-o", "json"])?;
    let pods: serde_json::Value = serde_json::from_str(&pods)?;
    assert_eq!(pods["items"].as_array().map(Vec::len), Some(0), "{pods}");
    Ok(())
}

#[test]
fn lab_down_leaves_nothing_behind() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(&pod_yaml("default", "a", "node-1"))?;
    let paths = lab.paths.clone();
    let agent = agent_pid(&lab, "node-0")?.context("node-0 agent")?;
    drop(lab);
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&paths.netns_prefix()))
                .collect()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    for dir in [&paths.state_dir, &paths.run_dir, &paths.bpf_dir] {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(
        !Path::new(&format!("/proc/{agent}")).exists(),
        "agent {agent} still running"
    );
    Ok(())
}

/// Runs the real ferrum-cni inside a node's namespace, as a runtime on that node would.
fn cni(
    lab: &Lab,
    node: &str,
    env: &[(&str, &str)],
    config: &serde_json::Value,
) -> Result<serde_json::Value> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(ferrum_e2e::bin("ferrum-cni")?);
    cmd.env_clear()
        .env("CNI_PATH", ferrum_e2e::bin_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ferrum_datapath::netns::command_in_netns(&mut cmd, &lab.node_netns(node))?;
    let mut child = cmd.spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let json: serde_json::Value = if out.stdout.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&out.stdout)?
    };
    if !out.status.success() {
        bail!(
            "ferrum-cni {env:?} failed: {json} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(json)
}

#[test]
fn cni_gc_releases_attachments_the_runtime_no_longer_has() -> Result<()> {
    let lab = Lab::up(1, &[])?;
    lab.apply(&pod_yaml("default", "kept", "node-0"))?;
    let kept_uid = lab.pod("default", "kept")?["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .replace('-', "");
    let config = serde_json::json!({
        "cniVersion": "1.1.0", "name": "ferrum", "type": "ferrum-cni",
        "agentSocket": lab.paths.agent_socket("node-0"),
    });
    // A sandbox the runtime does not know about (as if it crashed between ADD and recording it);
    // its netns carries the lab's prefix so `lab down` removes it whatever happens here.
    let leak_ns = lab.paths.pod_netns("leak0000-0000");
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &leak_ns])
        .status()?;
    assert!(status.success());
    let leak_path = format!("/run/netns/{leak_ns}");
    let add = cni(
        &lab,
        "node-0",
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "leak1"),
            ("CNI_NETNS", &leak_path),
            ("CNI_IFNAME", "eth0"),
        ],
        &config,
    )?;
    let leaked: Ipv4Addr = add["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("ADD result address")?
        .parse()?;

    let check = |id: &str, netns: &str, ip: Ipv4Addr| {
        let mut c = config.clone();
        c["prevResult"] = serde_json::json!({
            "cniVersion": "1.1.0",
            "ips": [{"address": format!("{ip}/32")}],
        });
        cni(
            &lab,
            "node-0",
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
            ],
            &c,
        )
    };
    check("leak1", &leak_path, leaked).context("the leaked attachment before GC")?;

    let mut gc_config = config.clone();
    gc_config["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": kept_uid, "ifname": "eth0"}]);
    cni(&lab, "node-0", &[("CNI_COMMAND", "GC")], &gc_config)?;

    // The leaked attachment is gone (CHECK fails, its veth is gone), the kept pod is untouched.
    assert!(
        check("leak1", &leak_path, leaked).is_err(),
        "leaked attachment survived GC"
    );
    let kept_ns = lab.pod_netns("default", "kept")?.display().to_string();
    check(&kept_uid, &kept_ns, lab.pod_ip("default", "kept")?).context("the kept pod after GC")?;
    let links = std::process::Command::new("ip")
        .args(["-n", &leak_ns, "link", "show", "eth0"])
        .output()?;
    assert!(!links.status.success(), "the leaked pod end should be gone");
    // The address is free again: a new pod can get it eventually (round robin), and the kept
    // pod still answers.
    assert_ne!(leaked, lab.pod_ip("default", "kept")?);
    assert_eq!(
        tcp_read(
            &lab.node_netns("node-0"),
            lab.pod_ip("default", "kept")?,
            80
        )?,
        "kept\n"
    );
    Ok(())
}
