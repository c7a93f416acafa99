//! NetworkPolicy enforced on a live VNet-mode lab (pods reach each other over the underlay, so
//! ingress is judged by the to_pod hook on the destination's veth): allowed and denied peers,
//! the node's own probes versus another node, flow records naming the deciding policy, and the
//! documented rule for established connections: a policy change is applied to them on their
//! next packet, so a connection the new policy denies stops, and resumes if it is allowed again.
//! (The 9×9 conformance matrix through ClusterIPs is tests/policy_conformance.rs.)

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ferrum_datapath::netns::run_in_netns;
use ferrum_e2e::{Lab, pod_yaml};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_millis(1500);

fn tcp_name(netns: &Path, ip: Ipv4Addr, port: u16) -> Result<Option<String>> {
    run_in_netns(netns, move || -> Result<Option<String>> {
        match TcpStream::connect_timeout(&SocketAddr::from((ip, port)), TIMEOUT) {
            Ok(mut s) => {
                s.set_read_timeout(Some(TIMEOUT))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(Some(out.trim().to_string()))
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => Ok(None),
            Err(e) => bail!("connect {ip}:{port}: {e}"),
        }
    })?
}

const POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}, {port: 7000}]
"#;

const DENY_ALL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
"#;

#[test]
fn policy_is_enforced_in_vnet_mode_and_applies_to_established_connections() -> Result<()> {
    let lab = Lab::up(
        2,
        &[
            "--network-plugin-mode",
            "vnet",
            "--vnet-cidr",
            "10.224.0.0/12",
            "--node-subnet",
            "10.224.0.0/16",
            "--pod-subnet",
            "10.225.0.0/24",
        ],
    )?;
    lab.apply(
        &[
            pod_yaml("default", "a", "node-0"),
            pod_yaml("default", "b", "node-1"),
            pod_yaml("default", "c", "node-0"),
            POLICY.to_string(),
        ]
        .join("---\n"),
    )?;
    let (a_ns, c_ns) = (
        lab.pod_netns("default", "a")?,
        lab.pod_netns("default", "c")?,
    );
    let b = lab.pod_ip("default", "b")?;

    ensure!(
        tcp_name(&a_ns, b, 80)? == Some("b".into()),
        "a -> b:80 is allowed"
    );
    ensure!(tcp_name(&c_ns, b, 80)?.is_none(), "c -> b:80 is dropped");
    // The node of b probes it (kubelet); the other node is an ordinary peer.
    ensure!(
        tcp_name(&lab.node_netns("node-1"), b, 80)? == Some("b".into()),
        "b's own node always gets in"
    );
    ensure!(
        tcp_name(&lab.node_netns("node-0"), b, 80)?.is_none(),
        "another node does not"
    );

    // The drop is recorded on b's node with the policy that decided it.
    let out = lab.ferrum_ok(&[
        "observe",
        "--verdict",
        "DROPPED",
        "--to-pod",
        "default/b",
        "-o",
        "json",
    ])?;
    let flows: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let denied = flows
        .iter()
        .find(|f| f["flow"]["source"]["pod_name"] == "c")
        .with_context(|| format!("no drop flow from c: {out}"))?;
    ensure!(
        denied["flow"]["drop_reason_desc"] == "POLICY_DENIED_INGRESS"
            && denied["flow"]["ingress_denied_by"][0]["name"] == "b-from-a",
        "{denied}"
    );

    // An established connection a -> b:7000 (a listener of the test's own in b's netns).
    let listener = run_in_netns(&lab.pod_netns("default", "b")?, move || {
        TcpListener::bind((b, 7000))
    })??;
    let mut client = run_in_netns(&a_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((b, 7000)), TIMEOUT)
    })??;
    let (mut server, _) = listener.accept()?;
    server.set_read_timeout(Some(TIMEOUT))?;
    client.set_read_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 16];
    client.write_all(b"1")?;
    ensure!(server.read(&mut buf)? == 1 && buf[0] == b'1', "data flows");
    server.write_all(b"r")?;
    ensure!(
        client.read(&mut buf)? == 1 && buf[0] == b'r',
        "replies flow"
    );

    // b now allows nothing: the connection's next packets are dropped, both ways.
    lab.apply(DENY_ALL)?;
    client.write_all(b"2")?;
    match server.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => bail!("the denied connection still delivered: {other:?}"),
    }
    // Allowed again: TCP retransmits and the same connection carries on.
    lab.apply(POLICY)?;
    server.set_read_timeout(Some(Duration::from_secs(8)))?;
    ensure!(
        server.read(&mut buf)? == 1 && buf[0] == b'2',
        "the connection resumes"
    );
    server.write_all(b"s")?;
    client.set_read_timeout(Some(Duration::from_secs(8)))?;
    ensure!(client.read(&mut buf)? == 1 && buf[0] == b's');

    // Deleting the policy lifts the isolation.
    let out = lab.ferrum(&["delete", "-f", "-"], Some(POLICY))?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        tcp_name(&c_ns, b, 80)? == Some("b".into()),
        "c -> b:80 after delete"
    );
    Ok(())
}
