//! Builds a real lab fabric in uniquely named namespaces, checks reachability with ping inside
//! them, and checks that teardown leaves nothing behind. Needs root.

use std::path::Path;
use std::process::Command;

use ferrum_lab::fabric;
use ferrum_lab::network_profile::{EXTERNAL_IP, NetworkProfile};
use ferrum_lab::profile::LabPaths;

/// Tears the lab down even when an assertion fails.
struct LabGuard(LabPaths);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = fabric::teardown(&self.0) {
            eprintln!("teardown of lab {} failed: {e}", self.0.name);
        }
    }
}

fn ping(from_netns: &str, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", from_netns, "ping", "-c1", "-W2", to])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn fabric_connects_nodes_and_external_host_and_teardown_removes_everything() {
    let name = format!("t{}", std::process::id());
    let paths = LabPaths::new(&name).unwrap();
    let guard = LabGuard(paths.clone());
    let profile = NetworkProfile {
        nodes: 3,
        ..Default::default()
    };
    profile.validate().unwrap();
    std::fs::create_dir_all(&paths.state_dir).unwrap();
    std::fs::create_dir_all(paths.run_dir.join("nodes/node-0")).unwrap();

    fabric::build(&paths, &profile).unwrap();

    let n0 = paths.node_netns("node-0");
    let n2 = paths.node_netns("node-2");
    let ext = paths.external_netns();
    assert!(
        ping(&n0, &profile.node_ip(2).to_string()),
        "node-0 -> node-2"
    );
    assert!(
        ping(&n2, &profile.node_ip(0).to_string()),
        "node-2 -> node-0"
    );
    assert!(ping(&n0, &EXTERNAL_IP.to_string()), "node-0 -> external");
    assert!(
        ping(&ext, &profile.node_ip(1).to_string()),
        "external -> node-1"
    );
    // The nodes see the external host's real address (nothing translates): its route back
    // goes through the fabric router, which is node-0's default gateway.
    let route = Command::new("ip")
        .args(["-n", &n0, "route", "get", &EXTERNAL_IP.to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains("via 10.224.0.1 dev eth0"), "{route}");

    // A process living in a node namespace (as an agent would) is found and killed by teardown.
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &n0, "sleep", "300"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !fabric::processes_in_netns(std::slice::from_ref(&n0)).is_empty(),
        "the sleeper in {n0} was not found"
    );

    let summary = fabric::teardown(&paths).unwrap();
    let _ = sleeper.wait();
    assert_eq!(summary.processes_killed, 1);
    assert_eq!(summary.netns_deleted.len(), 5, "{summary:?}");
    assert!(fabric::list_netns(&paths.netns_prefix()).is_empty());
    for dir in [&paths.state_dir, &paths.run_dir, &paths.bpf_dir] {
        assert!(!Path::new(dir).exists(), "{} left behind", dir.display());
    }
    // Idempotent: a second teardown of a lab that is gone succeeds and does nothing.
    assert_eq!(
        fabric::teardown(&paths).unwrap(),
        fabric::TeardownSummary::default()
    );
    drop(guard);
}

/// Two labs whose names extend one another ("t<pid>a" and "t<pid>a-x"): taking the shorter one
/// down leaves every namespace, process and directory of the other intact.
#[test]
fn teardown_of_one_lab_leaves_a_lab_with_a_longer_name_intact() {
    let short = LabPaths::new(&format!("t{}a", std::process::id())).unwrap();
    let long = LabPaths::new(&format!("{}-x", short.name)).unwrap();
    let _long_guard = LabGuard(long.clone());
    let _short_guard = LabGuard(short.clone());
    let profile = NetworkProfile {
        nodes: 1,
        ..Default::default()
    };
    for paths in [&short, &long] {
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        std::fs::create_dir_all(&paths.run_dir).unwrap();
        fabric::build(paths, &profile).unwrap();
    }
    let long_netns = fabric::list_netns(&long.netns_prefix());
    assert_eq!(long_netns.len(), 3, "{long_netns:?}");
    // A process of the other lab, which a prefix collision would kill.
    let n0 = long.node_netns("node-0");
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &n0, "sleep", "300"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));

    let summary = fabric::teardown(&short).unwrap();
    assert_eq!(summary.netns_deleted.len(), 3, "{summary:?}");
    assert_eq!(summary.processes_killed, 0, "{summary:?}");
    assert!(
        summary
            .netns_deleted
            .iter()
            .all(|ns| !long_netns.contains(ns)),
        "{summary:?} took namespaces of {}",
        long.name
    );
    assert_eq!(fabric::list_netns(&long.netns_prefix()), long_netns);
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the other lab's process was killed"
    );
    assert!(long.state_dir.exists() && long.run_dir.exists());
    assert!(
        ping(&n0, &profile.router_ip().to_string()),
        "{n0} lost its uplink"
    );

    fabric::teardown(&long).unwrap();
    let _ = sleeper.wait();
    assert!(fabric::list_netns(&long.netns_prefix()).is_empty());
}

#[test]
fn teardown_removes_pins() {
    let name = format!("p{}", std::process::id());
    let paths = LabPaths::new(&name).unwrap();
    let _guard = LabGuard(paths.clone());
    ensure_bpffs();
    // A real pinned object in the node's pin dir, as the agent leaves them.
    let node_dir = paths.node_bpf_dir("node-0");
    std::fs::create_dir_all(&node_dir).unwrap();
    let pin = node_dir.join("ferrum_test_map");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "8", "name", "ftest",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pin.exists());
    fabric::teardown(&paths).unwrap();
    assert!(!paths.bpf_dir.exists());
}

fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    if !mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount bpffs");
    }
}
