//! The lab's network plumbing: the fabric namespace (the "VNet" bridge and the router to the
//! external host), one namespace per node, and teardown of everything a lab created.
//!
//! Every address and link lives inside the lab's own namespaces: veths are created inside the
//! fabric namespace with their peer placed directly into the node/external namespace, so the
//! machine's root namespace is never touched. All names carry the lab's prefix
//! (`LabPaths::netns_prefix`) so `down` can find leftovers.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::network_profile::{EXTERNAL_GATEWAY, EXTERNAL_IP, EXTERNAL_PREFIX_LEN, NetworkProfile};
use crate::profile::LabPaths;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The bridge that plays the cloud network, inside the fabric namespace.
pub const BRIDGE: &str = "vnet";
/// Every node's uplink, inside the node namespace.
pub const NODE_UPLINK: &str = "eth0";
/// The fabric's link to the external host.
const FABRIC_EXTERNAL_LINK: &str = "ext";

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (is iproute2 installed?): {0}")]
    IpSpawn(std::io::Error),
    #[error("cannot enter network namespace {netns}: {reason}")]
    Netns { netns: String, reason: String },
    #[error("cannot set {key} in network namespace {netns}: {error}")]
    Sysctl {
        netns: String,
        key: String,
        error: std::io::Error,
    },
    #[error("cannot remove {path}: {error}")]
    Remove { path: String, error: std::io::Error },
    #[error("processes {pids:?} of lab {lab} did not exit after SIGKILL")]
    Unkillable { lab: String, pids: Vec<i32> },
}

/// The one wrapper through which the lab runs iproute2: checks the exit code and surfaces stderr.
pub fn ip(args: &[&str]) -> Result<String, FabricError> {
    debug!(args = ?args, "ip");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(FabricError::IpSpawn)?;
    if !out.status.success() {
        return Err(FabricError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Names of every namespace whose name starts with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

pub fn add_netns(name: &str) -> Result<(), FabricError> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named namespace; absent is fine.
pub fn delete_netns(name: &str) -> Result<(), FabricError> {
    if !netns_exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).map(|_| ())
}

/// Runs `f` on a fresh thread that has joined the named namespace; the caller's thread keeps
/// its own namespace.
pub fn run_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T, FabricError> {
    ferrum_datapath::netns::run_in_netns(&netns_path(netns), f).map_err(|e| FabricError::Netns {
        netns: netns.to_string(),
        reason: e.to_string(),
    })
}

/// Writes a sysctl (dotted key) inside the named namespace: /proc/sys/net follows the netns of
/// the thread that opens it.
pub fn set_sysctl(netns: &str, key: &str, value: &str) -> Result<(), FabricError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    run_in_netns(netns, || std::fs::write(&path, value))?.map_err(|error| FabricError::Sysctl {
        netns: netns.to_string(),
        key: key.to_string(),
        error,
    })
}

/// Builds the fabric, the external host and every node's namespace. On error, the caller tears
/// the lab down (`teardown`), which removes whatever was created.
pub fn build(paths: &LabPaths, profile: &NetworkProfile) -> Result<(), FabricError> {
    let fabric = paths.fabric_netns();
    add_netns(&fabric)?;
    ip(&["-n", &fabric, "link", "add", BRIDGE, "type", "bridge"])?;
    let router = format!(
        "{}/{}",
        profile.router_ip(),
        profile.node_subnet.prefix_len()
    );
    ip(&["-n", &fabric, "addr", "add", &router, "dev", BRIDGE])?;
    ip(&["-n", &fabric, "link", "set", BRIDGE, "up"])?;
    set_sysctl(&fabric, "net.ipv4.ip_forward", "1")?;

    let ext = paths.external_netns();
    add_netns(&ext)?;
    ip(&[
        "-n",
        &fabric,
        "link",
        "add",
        FABRIC_EXTERNAL_LINK,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ext,
    ])?;
    let gw = format!("{EXTERNAL_GATEWAY}/{EXTERNAL_PREFIX_LEN}");
    ip(&[
        "-n",
        &fabric,
        "addr",
        "add",
        &gw,
        "dev",
        FABRIC_EXTERNAL_LINK,
    ])?;
    ip(&["-n", &fabric, "link", "set", FABRIC_EXTERNAL_LINK, "up"])?;
    let ext_addr = format!("{EXTERNAL_IP}/{EXTERNAL_PREFIX_LEN}");
    ip(&["-n", &ext, "addr", "add", &ext_addr, "dev", "eth0"])?;
    ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ext,
        "route",
        "add",
        "default",
        "via",
        &EXTERNAL_GATEWAY.to_string(),
    ])?;

    for (index, node) in profile.node_names().iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        add_node(paths, profile, node, index)?;
    }
    info!(lab = %paths.name, nodes = profile.nodes, "fabric built");
    Ok(())
}

fn add_node(
    paths: &LabPaths,
    profile: &NetworkProfile,
    node: &str,
    index: u32,
) -> Result<(), FabricError> {
    let fabric = paths.fabric_netns();
    let ns = paths.node_netns(node);
    add_netns(&ns)?;
    // The fabric-side port is named after the node ("node-63" fits IFNAMSIZ).
    ip(&[
        "-n",
        &fabric,
        "link",
        "add",
        node,
        "type",
        "veth",
        "peer",
        "name",
        NODE_UPLINK,
        "netns",
        &ns,
    ])?;
    ip(&["-n", &fabric, "link", "set", node, "master", BRIDGE])?;
    ip(&["-n", &fabric, "link", "set", node, "up"])?;
    let addr = format!(
        "{}/{}",
        profile.node_ip(index),
        profile.node_subnet.prefix_len()
    );
    ip(&["-n", &ns, "addr", "add", &addr, "dev", NODE_UPLINK])?;
    ip(&["-n", &ns, "link", "set", NODE_UPLINK, "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &profile.router_ip().to_string(),
    ])?;
    set_sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// (device, inode) of a namespace file: how two handles to the same namespace compare equal.
fn ns_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Pids of every process whose network namespace is one of `netns_names`.
pub fn processes_in_netns(netns_names: &[String]) -> Vec<i32> {
    let wanted: HashSet<(u64, u64)> = netns_names
        .iter()
        .filter_map(|n| ns_identity(&netns_path(n)))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            ns_identity(&PathBuf::from(format!("/proc/{pid}/ns/net")))
                .is_some_and(|id| wanted.contains(&id))
        })
        .collect()
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL whatever is left. Returns the pids that survived.
pub fn terminate(pids: &[i32], grace: Duration) -> Vec<i32> {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left: Vec<i32> = pids.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left.retain(|&p| process_alive(p));
    }
    for &pid in &left {
        warn!(pid, "still running after SIGTERM; sending SIGKILL");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left.retain(|&p| process_alive(p));
    }
    left
}

/// Reads a pid file; a missing or garbled file is `None`.
pub fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The command line of a process, arguments separated by spaces.
pub fn process_cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The daemon's pid file.
pub fn daemon_pid_file(paths: &LabPaths) -> PathBuf {
    paths.run_dir.join("daemon.pid")
}

/// Whether `pid` is this lab's daemon (guards against a recycled pid in a stale pid file).
pub fn is_lab_daemon(paths: &LabPaths, pid: i32) -> bool {
    let cmd = process_cmdline(pid);
    let args: Vec<&str> = cmd.split(' ').collect();
    process_alive(pid)
        && args.windows(2).any(|w| w == ["lab", "daemon"])
        && args
            .windows(2)
            .any(|w| w == ["--name", paths.name.as_str()])
}

/// What `teardown` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TeardownSummary {
    pub daemon_stopped: bool,
    pub processes_killed: usize,
    pub netns_deleted: Vec<String>,
}

/// Removes everything a lab created, whatever state it is in (idempotent): the daemon, every
/// process living in the lab's namespaces (agents, pod commands), the namespaces, the bpffs
/// pins, the run and state directories.
pub fn teardown(paths: &LabPaths) -> Result<TeardownSummary, FabricError> {
    let mut summary = TeardownSummary::default();
    // 1. The daemon first, so it does not restart what we kill next.
    if let Some(pid) = read_pid_file(&daemon_pid_file(paths))
        && is_lab_daemon(paths, pid)
    {
        let left = terminate(&[pid], Duration::from_secs(10));
        if !left.is_empty() {
            return Err(FabricError::Unkillable {
                lab: paths.name.clone(),
                pids: left,
            });
        }
        summary.daemon_stopped = true;
    }
    // 2. Every process inside the lab's namespaces: agents in node namespaces, pod commands in
    // pod namespaces, anything a user started with `exec` — pid files can be stale, this cannot.
    let namespaces = list_netns(&paths.netns_prefix());
    let pids = processes_in_netns(&namespaces);
    if !pids.is_empty() {
        summary.processes_killed = pids.len();
        let left = terminate(&pids, Duration::from_secs(5));
        if !left.is_empty() {
            return Err(FabricError::Unkillable {
                lab: paths.name.clone(),
                pids: left,
            });
        }
    }
    // 3. Namespaces (their links go with them).
    for ns in &namespaces {
        delete_netns(ns)?;
        summary.netns_deleted.push(ns.clone());
    }
    // 4. Pins, run files, state.
    for dir in [&paths.bpf_dir, &paths.run_dir, &paths.state_dir] {
        remove_dir(dir)?;
    }
    // 5. The node cgroups (empty now that the lab's processes are gone).
    if let Some(cg) = crate::daemon::lab_cgroup(paths)
        && let Err(error) = ferrum_datapath::cgroup::remove_tree(&cg)
    {
        return Err(FabricError::Remove {
            path: cg.display().to_string(),
            error,
        });
    }
    // The shared parent goes with the last lab (other labs keep it busy: not an error).
    if let Some(parent) = crate::daemon::lab_cgroup(paths)
        .as_deref()
        .and_then(Path::parent)
    {
        let _ = std::fs::remove_dir(parent);
    }
    info!(lab = %paths.name, ?summary, "lab removed");
    Ok(summary)
}

fn remove_dir(dir: &Path) -> Result<(), FabricError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(FabricError::Remove {
            path: dir.display().to_string(),
            error,
        }),
    }
}
