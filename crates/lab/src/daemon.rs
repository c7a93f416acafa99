//! The lab daemon (`ferrum lab daemon`, started detached by `lab up`): owns the control plane,
//! serves its socket, supervises one `ferrum-agent` per node (restarted on exit, like a
//! DaemonSet) and runs one runtime per node. Exits cleanly on SIGTERM/SIGINT: agents are
//! stopped; pods (namespaces, processes) stay so a restarted daemon adopts them.

use ferrum_datapath::netns::command_in_netns;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use ferrum_model::{Kind, NodeNetworkConfig, Object};

use crate::controlplane::ControlPlane;
use crate::fabric;
use crate::network_profile::{NetworkPluginMode, NetworkProfile};
use crate::profile::LabPaths;
use crate::runtime::{Runtime, RuntimeConfig};

pub const AGENT_BINARY: &str = "ferrum-agent";
/// Port of each agent's observability API (metrics, flows, service map) on its node IP.
pub const OBSERVE_PORT: u16 = 9962;
pub const CNI_BINARY: &str = "ferrum-cni";
const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Profile(#[from] crate::network_profile::ProfileError),
    #[error("lab {lab}: control plane: {message}")]
    ControlPlane { lab: String, message: String },
    #[error("lab {lab}: cannot {what}: {error}")]
    Io {
        lab: String,
        what: String,
        error: std::io::Error,
    },
    #[error("lab {lab}: cannot block termination signals: {message}")]
    Signals { lab: String, message: String },
}

/// The directory holding `ferrum`'s sibling binaries (`ferrum-agent`, `ferrum-cni`):
/// $FERRUM_BIN_DIR, else the directory of the running executable (or its parent when that is
/// cargo's `deps` directory, as for test binaries).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRUM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    if !exe_dir.join(AGENT_BINARY).exists()
        && exe_dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = exe_dir.parent()
    {
        return parent.to_path_buf();
    }
    exe_dir
}

pub fn profile_path(paths: &LabPaths) -> PathBuf {
    paths.state_dir.join("profile.json")
}

pub fn agent_pid_file(paths: &LabPaths, node: &str) -> PathBuf {
    paths.run_dir.join("nodes").join(node).join("agent.pid")
}

/// The cgroup v2 directory of a lab (parent of its node cgroups), if cgroup v2 is mounted.
pub fn lab_cgroup(paths: &LabPaths) -> Option<PathBuf> {
    Some(
        ferrum_datapath::cgroup::cgroup2_root()?
            .join("ferrum")
            .join(&paths.name),
    )
}

/// The cgroup holding a node's host processes (its agent, and anything run "on the node").
pub fn node_cgroup(paths: &LabPaths, node: &str) -> Option<PathBuf> {
    Some(lab_cgroup(paths)?.join(node))
}

pub fn agent_log(paths: &LabPaths, node: &str) -> PathBuf {
    paths.node_state_dir(node).join("agent.log")
}

/// The Node object the lab registers for node `index` (Ready until an agent says otherwise is
/// false).
pub fn node_object(profile: &NetworkProfile, index: u32, ready: bool) -> Node {
    let pod_cidr = (profile.network_plugin_mode == NetworkPluginMode::Overlay)
        .then(|| profile.node_pod_cidr(index));
    node_object_with(profile, index, ready, pod_cidr)
}

/// The Node object with a given pod CIDR (overlay: the node's block; VNet: none, as on AKS).
pub fn node_object_with(
    profile: &NetworkProfile,
    index: u32,
    ready: bool,
    pod_cidr: Option<ipnet::Ipv4Net>,
) -> Node {
    let name = crate::network_profile::node_name(index);
    let pod_cidr = pod_cidr.map(|c| c.to_string());
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidr.clone(),
            pod_cidrs: pod_cidr.map(|c| vec![c]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: profile.node_ip(index).to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name,
                },
            ]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: Some(if ready { "AgentReady" } else { "AgentNotReady" }.into()),
                message: Some(
                    if ready {
                        "ferrum-agent is ready"
                    } else {
                        "waiting for ferrum-agent"
                    }
                    .into(),
                ),
                last_transition_time: Some(crate::runtime::now()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Nodes (and in VNet mode their NodeNetworkConfigs) the lab still has to register. In
/// overlay mode each new node gets the lowest free block of the pod CIDR; a node that cannot
/// get one is refused with an error naming it and the CIDR.
pub fn missing_objects(
    cp: &ControlPlane,
    profile: &NetworkProfile,
    existing: &[String],
) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    let mut blocks = ferrum_ipam::BlockAllocator::new(
        profile.pod_cidr,
        crate::network_profile::NODE_POD_PREFIX_LEN,
    )
    .map_err(|e| e.to_string())?;
    if profile.network_plugin_mode == NetworkPluginMode::Overlay {
        for o in cp.list(Kind::Node, None) {
            if let Object::Node(n) = o
                && let Some(cidr) = n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref())
                && let Ok(cidr) = cidr.parse()
            {
                blocks
                    .adopt(n.metadata.name.as_deref().unwrap_or_default(), cidr)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    for index in 0..profile.nodes {
        let name = crate::network_profile::node_name(index);
        if existing.contains(&name) {
            continue;
        }
        let pod_cidr = match profile.network_plugin_mode {
            NetworkPluginMode::Overlay => Some(blocks.assign(&name).map_err(|e| e.to_string())?),
            NetworkPluginMode::Vnet => None,
        };
        out.push(Object::Node(node_object_with(
            profile, index, false, pod_cidr,
        )));
    }
    if profile.network_plugin_mode == NetworkPluginMode::Vnet {
        let have: Vec<String> = cp
            .list(Kind::NodeNetworkConfig, None)
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        for name in profile.node_names() {
            if !have.contains(&name) {
                // A node starts by asking for one batch.
                out.push(Object::NodeNetworkConfig(NodeNetworkConfig::new(
                    &name,
                    profile.ip_batch_size,
                )));
            }
        }
    }
    Ok(out)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(paths: &LabPaths) -> Result<(), DaemonError> {
    let lab = paths.name.clone();
    let io = |what: String| {
        let lab = lab.clone();
        move |error| DaemonError::Io { lab, what, error }
    };
    let cp_err = |e: &dyn std::fmt::Display| DaemonError::ControlPlane {
        lab: lab.clone(),
        message: e.to_string(),
    };
    // Block the termination signals in every thread (threads inherit the mask), and take them
    // synchronously on this thread below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| DaemonError::Signals {
        lab: lab.clone(),
        message: e.to_string(),
    })?;

    let profile = NetworkProfile::load(&profile_path(paths))?;
    std::fs::create_dir_all(&paths.run_dir)
        .map_err(io(format!("create {}", paths.run_dir.display())))?;
    std::fs::write(
        fabric::daemon_pid_file(paths),
        format!("{}\n", std::process::id()),
    )
    .map_err(io("write the daemon pid file".into()))?;

    let cp = ControlPlane::open(&paths.state_dir).map_err(|e| cp_err(&e))?;
    cp.set_service_network(crate::controlplane::ServiceNet {
        cidr: profile.service_cidr,
        reserved: vec![profile.dns_service_ip],
        lb_pool: Some(profile.lb_pool),
    });
    let existing: Vec<String> = cp
        .list(Kind::Node, None)
        .iter()
        .filter_map(|o| o.metadata().name.clone())
        .collect();
    let missing = missing_objects(&cp, &profile, &existing).map_err(|e| cp_err(&e))?;
    if !missing.is_empty() {
        cp.apply(missing).map_err(|e| cp_err(&e))?;
    }
    let _server = crate::server::serve(cp.clone(), &paths.cp_socket()).map_err(|e| cp_err(&e))?;
    info!(lab = %lab, socket = %paths.cp_socket().display(), "control plane serving");

    let stop = Arc::new(AtomicBool::new(false));
    let bin = bin_dir();
    let mut threads = Vec::new();
    for (index, node) in profile.node_names().into_iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        std::fs::create_dir_all(paths.node_state_dir(&node))
            .map_err(io(format!("create the state dir of {node}")))?;
        std::fs::create_dir_all(paths.run_dir.join("nodes").join(&node))
            .map_err(io(format!("create the run dir of {node}")))?;
        let supervisor = AgentSupervisor {
            paths: paths.clone(),
            profile: profile.clone(),
            node: node.clone(),
            binary: bin.join(AGENT_BINARY),
            cp: cp.clone(),
        };
        let s = stop.clone();
        threads.push(std::thread::spawn(move || supervisor.run(&s)));

        let cfg = RuntimeConfig {
            paths: paths.clone(),
            node: node.clone(),
            host_ip: profile.node_ip(index),
            bin_dir: bin.clone(),
            max_pods: profile.max_pods,
        };
        let (s, cp) = (stop.clone(), cp.clone());
        threads.push(std::thread::spawn(move || {
            let mut backoff = Duration::from_millis(500);
            while !s.load(Ordering::Relaxed) {
                match Runtime::new(cfg.clone(), cp.clone()).run(&s) {
                    Ok(()) => break,
                    Err(e) => {
                        error!(node = %cfg.node, error = %e, "runtime failed; restarting it");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }));
    }
    {
        let (s, cp, profile) = (stop.clone(), cp.clone(), profile.clone());
        threads.push(std::thread::spawn(move || {
            sync_node_readiness(&cp, &profile, &s)
        }));
    }
    {
        let (s, cp, fabric) = (stop.clone(), cp.clone(), paths.fabric_netns());
        let nodes = profile
            .node_names()
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, profile.node_ip(u32::try_from(i).unwrap_or(u32::MAX))))
            .collect();
        threads.push(std::thread::spawn(move || {
            crate::lbroutes::run(&cp, &fabric, nodes, &s)
        }));
    }
    if profile.network_plugin_mode == NetworkPluginMode::Vnet {
        let (s, cp, profile) = (stop.clone(), cp.clone(), profile.clone());
        let routes = Box::new(crate::cloud::FabricRoutes {
            netns: paths.fabric_netns(),
        });
        threads.push(std::thread::spawn(move || {
            crate::cloud::run(cp, profile, routes, &s)
        }));
    }

    let signal = signals.wait();
    info!(lab = %lab, ?signal, "stopping");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(fabric::daemon_pid_file(paths));
    info!(lab = %lab, "daemon stopped");
    Ok(())
}

/// Mirrors each agent's readiness into its Node's Ready condition, as the node lifecycle
/// controller does with kubelet heartbeats.
fn sync_node_readiness(cp: &ControlPlane, profile: &NetworkProfile, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let reports = cp.reports();
        let nodes = cp.list(Kind::Node, None);
        for index in 0..profile.nodes {
            let name = crate::network_profile::node_name(index);
            let agent_ready = reports
                .get(&format!("agent/{name}"))
                .is_some_and(|r| r.ready);
            let recorded = nodes.iter().find_map(|o| match o {
                Object::Node(n) if n.metadata.name.as_deref() == Some(&name) => Some(node_ready(n)),
                _ => None,
            });
            if recorded.is_some_and(|r| r != agent_ready) {
                info!(node = %name, ready = agent_ready, "node readiness changed");
                // Keep the pod CIDR the node was given.
                let pod_cidr = nodes.iter().find_map(|o| match o {
                    Object::Node(n) if n.metadata.name.as_deref() == Some(&name) => n
                        .spec
                        .as_ref()
                        .and_then(|s| s.pod_cidr.as_deref())
                        .and_then(|c| c.parse().ok()),
                    _ => None,
                });
                if let Err(e) = cp.apply(vec![Object::Node(node_object_with(
                    profile,
                    index,
                    agent_ready,
                    pod_cidr,
                ))]) {
                    warn!(node = %name, error = %e, "cannot update node readiness");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Keeps one node's agent running.
struct AgentSupervisor {
    paths: LabPaths,
    profile: NetworkProfile,
    node: String,
    binary: PathBuf,
    cp: ControlPlane,
}

enum Running {
    Child(Child),
    /// An agent left running by an earlier daemon: watched by pid until it exits.
    Adopted(i32),
}

impl AgentSupervisor {
    fn run(&self, stop: &AtomicBool) {
        let pid_file = agent_pid_file(&self.paths, &self.node);
        let mut current = fabric::read_pid_file(&pid_file)
            .filter(|pid| self.is_our_agent(*pid))
            .map(|pid| {
                info!(node = %self.node, pid, "adopting the running agent");
                Running::Adopted(pid)
            });
        let mut backoff = Duration::from_millis(500);
        while !stop.load(Ordering::Relaxed) {
            let mut proc = match current.take() {
                Some(p) => p,
                None => match self.spawn() {
                    Ok(child) => {
                        let _ = std::fs::write(&pid_file, format!("{}\n", child.id()));
                        info!(node = %self.node, pid = child.id(), "agent started");
                        Running::Child(child)
                    }
                    Err(e) => {
                        error!(node = %self.node, binary = %self.binary.display(), error = %e, "cannot start agent");
                        sleep_unless_stopped(backoff, stop);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            let started = Instant::now();
            // Wait for it to exit or for the stop request.
            let status = loop {
                if stop.load(Ordering::Relaxed) {
                    self.stop_agent(&mut proc);
                    let _ = std::fs::remove_file(&pid_file);
                    return;
                }
                match &mut proc {
                    Running::Child(c) => match c.try_wait() {
                        Ok(Some(status)) => break status.to_string(),
                        Ok(None) => {}
                        Err(e) => break format!("unknown ({e})"),
                    },
                    Running::Adopted(pid) => {
                        if !fabric::process_alive(*pid) {
                            break "unknown (adopted)".to_string();
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            warn!(node = %self.node, %status, log = %agent_log(&self.paths, &self.node).display(), ?backoff, "agent exited; restarting");
            // Its last report no longer holds: the node is not ready, and nothing is realized
            // there until the next agent says so (apply waits for it).
            self.cp.report(
                &format!("agent/{}", self.node),
                ferrum_model::AgentReport {
                    node: self.node.clone(),
                    ready: false,
                    realized_revision: 0,
                    message: format!("agent exited ({status}); restarting"),
                },
            );
            sleep_unless_stopped(backoff, stop);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn is_our_agent(&self, pid: i32) -> bool {
        let cmd = fabric::process_cmdline(pid);
        let args: Vec<&str> = cmd.split(' ').collect();
        // Whole arguments: "fe-demo.n-node-0" is a substring of lab "xfe-demo"'s netns path.
        let netns = fabric::netns_path(&self.paths.node_netns(&self.node));
        fabric::process_alive(pid)
            && cmd.contains(AGENT_BINARY)
            && args
                .windows(2)
                .any(|w| w == ["--node-name", self.node.as_str()])
            && args
                .windows(2)
                .any(|w| w[0] == "--netns" && Path::new(w[1]) == netns)
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let p = &self.paths;
        // Re-read the profile: `lab update` may have changed it (then restarts the agents).
        let profile =
            NetworkProfile::load(&profile_path(p)).unwrap_or_else(|_| self.profile.clone());
        let netns = fabric::netns_path(&p.node_netns(&self.node));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(agent_log(p, &self.node))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--node-name")
            .arg(&self.node)
            .arg("--netns")
            .arg(&netns)
            .arg("--lab-socket")
            .arg(p.cp_socket())
            .arg("--socket")
            .arg(p.agent_socket(&self.node))
            .arg("--observe-socket")
            .arg(p.observe_socket(&self.node))
            .arg("--observe-addr")
            .arg(format!("0.0.0.0:{OBSERVE_PORT}"))
            .arg("--state-dir")
            .arg(p.node_state_dir(&self.node))
            .arg("--bpf-pin-dir")
            .arg(p.node_bpf_dir(&self.node))
            .arg("--uplink")
            .arg(fabric::NODE_UPLINK)
            .arg("--cluster-pod-cidr")
            .arg(profile.pod_range().to_string())
            .arg("--max-pods")
            .arg(profile.max_pods.to_string())
            .arg("--lb-algorithm")
            .arg(&profile.lb_algorithm)
            .arg("--ipam-mode")
            .arg(profile.network_plugin_mode.to_string())
            .arg("--log-format")
            .arg("json")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Socket-level load balancing hooks the node's own cgroup (never the root cgroup).
        if let Some(cg) = node_cgroup(p, &self.node) {
            match ferrum_datapath::cgroup::create(&cg) {
                Ok(()) => {
                    cmd.arg("--cgroup").arg(cg);
                }
                Err(e) => tracing::warn!(node = %self.node, cgroup = %cg.display(), error = %e,
                    "no node cgroup: host processes of the node get no socket-level load balancing"),
            }
        }
        // The agent also enters --netns itself; starting it there already means nothing it does
        // before that can touch the root namespace.
        command_in_netns(&mut cmd, &netns).map_err(std::io::Error::other)?;
        // SAFETY: only sigemptyset/pthread_sigmask (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The daemon blocks SIGTERM; the agent must not inherit that.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        cmd.spawn()
    }

    fn stop_agent(&self, proc: &mut Running) {
        match proc {
            Running::Child(child) => {
                let pid = child.id() as i32;
                let left = fabric::terminate(&[pid], AGENT_STOP_GRACE);
                let _ = child.wait();
                if !left.is_empty() {
                    warn!(node = %self.node, pid, "agent needed SIGKILL");
                }
            }
            Running::Adopted(pid) => {
                fabric::terminate(&[*pid], AGENT_STOP_GRACE);
            }
        }
        info!(node = %self.node, "agent stopped");
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}
