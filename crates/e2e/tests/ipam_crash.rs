//! The node agent killed with SIGKILL at random instants while pods come and go (VNet mode, so
//! batches move too): once everything settles, the agent's IPAM store holds exactly one address
//! per running pod, no address twice, nothing leaked, and every address is one the cloud
//! assigned to the node.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ferrum_e2e::Lab;
use serde_json::Value;

fn pods_yaml(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {prefix}{i}}}\nspec: {{nodeName: node-0, containers: [{{name: c}}]}}\n"
            )
        })
        .collect()
}

/// SIGKILLs node-0's agent at random intervals until `stop`.
fn killer(lab_name: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let paths = ferrum_lab::profile::LabPaths::new(&lab_name).expect("lab name");
        let pid_file = ferrum_lab::daemon::agent_pid_file(&paths, "node-0");
        let mut seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
            | 1;
        let mut kills = 0;
        while !stop.load(Ordering::Relaxed) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_millis(200 + seed % 900));
            if let Some(pid) = ferrum_lab::fabric::read_pid_file(&pid_file)
                && ferrum_lab::fabric::process_alive(pid)
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
            {
                kills += 1;
            }
        }
        kills
    })
}

fn store_leases(lab: &Lab) -> Result<BTreeMap<String, Ipv4Addr>> {
    let path = lab.paths.node_state_dir("node-0").join("ipam.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = BTreeMap::new();
    for l in v["leases"].as_array().context("leases")? {
        let id = l["key"]["containerId"].as_str().context("key")?.to_string();
        let ip: Ipv4Addr = l["ip"].as_str().context("ip")?.parse()?;
        if out.insert(id.clone(), ip).is_some() {
            bail!("container {id} holds two addresses");
        }
    }
    Ok(out)
}

fn running_ips(lab: &Lab) -> Result<BTreeMap<String, Ipv4Addr>> {
    let list: Value = serde_json::from_str(&lab.ferrum_ok(&["get", "pods", "-o", "json"])?)?;
    let mut out = BTreeMap::new();
    for p in list["items"].as_array().context("items")? {
        if p["status"]["phase"] == "Running" {
            let uid = p["metadata"]["uid"]
                .as_str()
                .context("uid")?
                .replace('-', "");
            out.insert(
                uid,
                p["status"]["podIP"].as_str().context("podIP")?.parse()?,
            );
        }
    }
    Ok(out)
}

fn settle(lab: &Lab, want_running: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = running_ips(lab)?;
        let leases = store_leases(lab)?;
        if running.len() == want_running && leases == running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not settled: {} running (want {want_running}), store {leases:?}, pods {running:?}",
                running.len()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn agent_sigkill_at_random_points_never_duplicates_or_leaks_addresses() -> Result<()> {
    let lab = Lab::up(
        1,
        &[
            "--network-plugin-mode",
            "vnet",
            "--pod-subnet",
            "10.225.0.0/16",
        ],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let kills = killer(lab.name.clone(), Arc::clone(&stop));
    let run = || -> Result<()> {
        let out = lab.ferrum(
            &["apply", "--no-wait", "-f", "-"],
            Some(&pods_yaml("p", 40)),
        )?;
        anyhow::ensure!(out.status.success(), "apply: {out:?}");
        std::thread::sleep(Duration::from_secs(4));
        // Delete half while the agent keeps dying.
        let out = lab.ferrum(
            &["delete", "--no-wait", "-f", "-"],
            Some(&pods_yaml("p", 20)),
        )?;
        anyhow::ensure!(out.status.success(), "delete: {out:?}");
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    };
    let result = run();
    stop.store(true, Ordering::Relaxed);
    let kills = kills.join().expect("killer thread");
    result?;
    assert!(kills >= 3, "the agent was killed only {kills} times");
    // 20 pods remain (p20..p39); once the agent is back, the store holds exactly their addresses.
    settle(&lab, 20)?;
    let leases = store_leases(&lab)?;
    let ips: BTreeSet<Ipv4Addr> = leases.values().copied().collect();
    assert_eq!(ips.len(), leases.len(), "an address is held twice");
    let nnc: Value = serde_json::from_str(&lab.ferrum_ok(&["get", "nnc", "-A", "-o", "json"])?)?;
    let assigned: BTreeSet<Ipv4Addr> = nnc["items"][0]["status"]["assignedIPs"]
        .as_array()
        .context("assignedIPs")?
        .iter()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    assert!(
        ips.is_subset(&assigned),
        "a pod address the cloud did not assign: {ips:?} {assigned:?}"
    );
    eprintln!(
        "agent SIGKILLed {kills} times; {} pods, {} addresses assigned",
        ips.len(),
        assigned.len()
    );
    Ok(())
}
