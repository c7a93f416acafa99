//! VNet mode end to end on one shared lab: pods get pod-subnet addresses in batches from the
//! lab's cloud, talk across nodes over the underlay (no VXLAN device), and a full pod subnet
//! makes CNI ADD fail with a permanent error until an address frees up; the lab runtime
//! enforces max pods; `lab status -o json` shows the whole profile.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_e2e::{Lab, pod_yaml};
use serde_json::Value;

fn nnc_ips(lab: &Lab, node: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let list: Value = serde_json::from_str(&lab.ferrum_ok(&["get", "nnc", "-A", "-o", "json"])?)?;
    let item = list["items"]
        .as_array()
        .and_then(|i| i.iter().find(|n| n["metadata"]["name"] == node))
        .with_context(|| format!("no NodeNetworkConfig for {node}: {list}"))?;
    Ok(item["status"]["assignedIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn phase(lab: &Lab, name: &str) -> Result<(String, String)> {
    let pod = lab.pod("default", name)?;
    let phase = pod["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((phase, pod.to_string()))
}

#[test]
fn vnet_mode_batches_underlay_routing_exhaustion_and_max_pods() -> Result<()> {
    // 30 usable addresses: node-0 gets a batch of 16, node-1 only the 14 left.
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
            "10.225.0.0/27",
            "--max-pods",
            "15",
        ],
    )?;
    let status = lab.status()?;
    let profile = &status["profile"];
    assert_eq!(profile["networkPluginMode"], "vnet", "{status}");
    assert_eq!(profile["podSubnet"], "10.225.0.0/27");
    assert_eq!(profile["maxPods"], 15);
    assert_eq!(profile["ipBatchSize"], 16);
    assert_eq!(profile["serviceCidr"], "10.0.0.0/16");
    assert_eq!(profile["dnsServiceIp"], "10.0.0.10");

    // No encapsulation device in VNet mode.
    let links = std::process::Command::new("ip")
        .args(["-n", &lab.paths.node_netns("node-0"), "link"])
        .output()?;
    assert!(!String::from_utf8_lossy(&links.stdout).contains("ferrum_vxlan"));

    lab.apply(
        &(pod_yaml("default", "a", "node-0") + "---\n" + &pod_yaml("default", "b", "node-1")),
    )?;
    let (a, b) = (lab.pod_ip("default", "a")?, lab.pod_ip("default", "b")?);
    let (n0, n1) = (nnc_ips(&lab, "node-0")?, nnc_ips(&lab, "node-1")?);
    assert_eq!(n0.len(), 16);
    assert!(
        n0.is_disjoint(&n1),
        "an address on two nodes: {n0:?} {n1:?}"
    );
    assert!(n0.contains(&a) && n1.contains(&b), "{a} {b} {n0:?} {n1:?}");
    // Across nodes on the underlay, both ways.
    assert_eq!(
        lab.exec("default", "a", &["nc", "-w", "3", &b.to_string(), "80"])?,
        (0, "b\n".into())
    );
    assert_eq!(
        lab.exec("default", "b", &["nc", "-w", "3", &a.to_string(), "80"])?,
        (0, "a\n".into())
    );
    // A ClusterIP whose backend is on the other node: the request goes out natively and the
    // reply, arriving on node-0's uplink, is translated back to the VIP.
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: to-b}\n\
         spec: {selector: {app: b}, ports: [{port: 8000, targetPort: 80}]}\n",
    )?;
    let services: Value =
        serde_json::from_str(&lab.ferrum_ok(&["get", "services", "-o", "json"])?)?;
    let vip = services["items"]
        .as_array()
        .and_then(|items| items.iter().find(|s| s["metadata"]["name"] == "to-b"))
        .and_then(|s| s["spec"]["clusterIP"].as_str())
        .with_context(|| format!("no clusterIP for to-b: {services}"))?
        .to_string();
    let mut last = (0, String::new());
    wait_for(
        "the Service to answer through its VIP",
        Duration::from_secs(10),
        || {
            last = lab.exec("default", "a", &["nc", "-w", "3", &vip, "8000"])?;
            Ok(last == (0, "b\n".into()))
        },
    )
    .with_context(|| format!("last answer {last:?}"))?;

    // Fill node-1: it holds 14 addresses and the subnet is full, so the 15th pod cannot start.
    let mut yaml = String::new();
    for i in 0..14 {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: f{i}}}\nspec: {{nodeName: node-1, containers: [{{name: c}}]}}\n"
        );
    }
    lab.apply(&yaml)?;
    wait_for(
        "the 15th pod on node-1 to fail with a full subnet",
        Duration::from_secs(30),
        || {
            let running = (0..14)
                .filter(|i| phase(&lab, &format!("f{i}")).is_ok_and(|(p, _)| p == "Running"))
                .count();
            let waiting: Vec<String> = (0..14)
                .filter_map(|i| phase(&lab, &format!("f{i}")).ok())
                .filter(|(p, _)| p != "Running")
                .map(|(_, pod)| pod)
                .collect();
            Ok(running == 13 && waiting.len() == 1 && waiting[0].contains("is full"))
        },
    )?;
    let n1 = nnc_ips(&lab, "node-1")?;
    assert_eq!(n1.len(), 14);
    assert!(n1.is_disjoint(&nnc_ips(&lab, "node-0")?));

    // Free one address on node-1: the waiting pod starts with it.
    let del = lab.ferrum(
        &["delete", "-f", "-"],
        Some(&pod_yaml("default", "b", "node-1")),
    )?;
    assert!(del.status.success(), "{del:?}");
    wait_for(
        "the waiting pod to start once an address is free",
        Duration::from_secs(30),
        || Ok((0..14).all(|i| phase(&lab, &format!("f{i}")).is_ok_and(|(p, _)| p == "Running"))),
    )?;
    let ips: BTreeSet<Ipv4Addr> = (0..14)
        .map(|i| lab.pod_ip("default", &format!("f{i}")))
        .collect::<Result<_>>()?;
    assert_eq!(ips.len(), 14, "duplicate pod addresses");

    // Max pods 15: node-0 runs a; of 15 more pods 14 start and the last waits with the
    // runtime's max-pods message (node-0 holds 16 addresses, so IPAM is not the limit).
    let mut yaml = String::new();
    for i in 0..15 {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: m{i}}}\nspec: {{nodeName: node-0, containers: [{{name: c}}]}}\n"
        );
    }
    lab.apply(&yaml)?;
    wait_for(
        "node-0 to refuse the pod beyond max pods",
        Duration::from_secs(60),
        || {
            let states: Vec<(String, String)> = (0..15)
                .filter_map(|i| phase(&lab, &format!("m{i}")).ok())
                .collect();
            let running = states.iter().filter(|(p, _)| p == "Running").count();
            Ok(running == 14 && states.iter().any(|(_, pod)| pod.contains("max pods is 15")))
        },
    )?;
    Ok(())
}
