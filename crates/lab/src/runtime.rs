//! The per-node runtime: plays kubelet + containerd for the pods scheduled to one node.
//!
//! For each Pod with `spec.nodeName` == this node it creates the pod's network namespace, runs
//! the real `ferrum-cni` binary exactly as containerd does (CNI env vars, conflist-derived
//! stdin, executed in the node's namespace), writes the pod's status, then serves the declared
//! containerPorts inside the pod namespace (TCP: "<pod name>\n" then close; UDP: "<pod name>\n"
//! per datagram) and runs the containers' commands there.
//!
//! State that must survive a daemon restart is kept per pod in
//! `run_dir/nodes/<node>/pods/<uid>.json`; a restarted runtime adopts a pod whose record, spec,
//! namespace and IP still match, without running CNI ADD again.

use ferrum_datapath::netns::command_in_netns;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, HostIP, Pod, PodCondition, PodIP,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use ferrum_model::{AgentReport, Object, WatchEvent};

use crate::controlplane::ControlPlane;
use crate::fabric;
use crate::profile::LabPaths;

/// The CNI network name, as in the conflist.
pub const CNI_NETWORK: &str = "ferrum";
pub const CNI_VERSION: &str = "1.1.0";
pub const CNI_PLUGIN: &str = "ferrum-cni";
/// CNI error code for "try again later" (the agent is not ready yet).
const CNI_TRY_AGAIN: u64 = 11;
const CNI_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(200);
const GC_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime of node {node}: the control plane's watch stream ended")]
    WatchEnded { node: String },
    #[error("runtime of node {node}: cannot write {path}: {error}")]
    Write {
        node: String,
        path: String,
        error: std::io::Error,
    },
}

/// What one node's runtime needs to know.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub paths: LabPaths,
    pub node: String,
    pub host_ip: Ipv4Addr,
    /// Where `ferrum-cni` lives (CNI_PATH).
    pub bin_dir: PathBuf,
    /// Pods this node runs at most (the profile's max pods); more stay Pending, as kubelet
    /// refuses pods beyond its --max-pods.
    pub max_pods: u32,
}

impl RuntimeConfig {
    fn node_netns(&self) -> String {
        self.paths.node_netns(&self.node)
    }
    fn records_dir(&self) -> PathBuf {
        self.paths
            .run_dir
            .join("nodes")
            .join(&self.node)
            .join("pods")
    }
    fn record_path(&self, uid: &str) -> PathBuf {
        self.records_dir().join(format!("{uid}.json"))
    }
    pub fn conflist_path(&self) -> PathBuf {
        self.paths
            .node_state_dir(&self.node)
            .join("cni")
            .join("10-ferrum.conflist")
    }
    fn logs_dir(&self) -> PathBuf {
        self.paths.node_state_dir(&self.node).join("pods")
    }
}

/// The conflist the runtime keeps for its node, as containerd would find it in /etc/cni/net.d.
pub fn conflist(agent_socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK,
        "plugins": [{ "type": CNI_PLUGIN, "agentSocket": agent_socket }],
    })
}

/// A plugin's stdin: its conflist entry with the list's cniVersion and name inserted (libcni).
pub fn plugin_config(conflist: &serde_json::Value) -> serde_json::Value {
    let mut plugin = conflist["plugins"][0].clone();
    if let Some(obj) = plugin.as_object_mut() {
        obj.insert("cniVersion".into(), conflist["cniVersion"].clone());
        obj.insert("name".into(), conflist["name"].clone());
    }
    plugin
}

/// The identity of a pod as the CNI plugin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdent {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodIdent {
    /// CNI_CONTAINERID: the pod uid without dashes (the sandbox id).
    pub fn container_id(&self) -> String {
        self.uid.replace('-', "")
    }
}

/// Why a CNI call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniFailure {
    /// The CNI error code (None when the plugin could not run or printed no error).
    pub code: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "CNI error {code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Runs the CNI plugin for one command, the way containerd's libcni does.
pub fn run_cni(
    cfg: &RuntimeConfig,
    command: &str,
    pod: &PodIdent,
    pod_netns: &str,
) -> Result<serde_json::Value, CniFailure> {
    let list = conflist(&cfg.paths.agent_socket(&cfg.node));
    let stdin = plugin_config(&list).to_string();
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace,
        pod.name,
        pod.container_id(),
        pod.uid
    );
    let mut cmd = Command::new(cfg.bin_dir.join(CNI_PLUGIN));
    cmd.env("CNI_CONTAINERID", pod.container_id())
        .env("CNI_NETNS", fabric::netns_path(pod_netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", cni_args);
    exec_plugin(cfg, cmd, command, &stdin)
}

/// CNI GC, as containerd runs it: every attachment not listed as valid is released.
pub fn run_cni_gc(cfg: &RuntimeConfig, valid_container_ids: &[String]) -> Result<(), CniFailure> {
    let list = conflist(&cfg.paths.agent_socket(&cfg.node));
    let mut config = plugin_config(&list);
    config["cni.dev/valid-attachments"] = valid_container_ids
        .iter()
        .map(|id| serde_json::json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    let cmd = Command::new(cfg.bin_dir.join(CNI_PLUGIN));
    exec_plugin(cfg, cmd, "GC", &config.to_string()).map(|_| ())
}

/// Runs the plugin in the node's namespace with the common CNI environment and `stdin`, and
/// interprets its result or CNI error.
fn exec_plugin(
    cfg: &RuntimeConfig,
    mut cmd: Command,
    command: &str,
    stdin: &str,
) -> Result<serde_json::Value, CniFailure> {
    let fail = |code, message: String| CniFailure { code, message };
    let plugin = cfg.bin_dir.join(CNI_PLUGIN);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", &cfg.bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The plugin runs in the node's namespace, as it would under containerd on that node.
    command_in_netns(&mut cmd, &fabric::netns_path(&cfg.node_netns()))
        .map_err(|e| fail(None, format!("node netns {}: {e}", cfg.node_netns())))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(None, format!("cannot run {}: {e}", plugin.display())))?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let deadline = Instant::now() + CNI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    None,
                    format!("{CNI_PLUGIN} {command} did not finish in {CNI_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(fail(None, format!("waiting for {CNI_PLUGIN}: {e}"))),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let parsed: Option<serde_json::Value> = serde_json::from_str(stdout.trim()).ok();
    if status.success() {
        return Ok(parsed.unwrap_or(serde_json::Value::Null));
    }
    match parsed {
        Some(err) if err.get("code").is_some() => {
            let msg = err["msg"].as_str().unwrap_or_default();
            let details = err["details"].as_str().unwrap_or_default();
            Err(fail(
                err["code"].as_u64(),
                if details.is_empty() {
                    msg.to_string()
                } else {
                    format!("{msg} ({details})")
                },
            ))
        }
        _ => Err(fail(
            None,
            format!(
                "{CNI_PLUGIN} {command} exited with {status}: {}",
                stderr.trim()
            ),
        )),
    }
}

/// The pod IP from a CNI result (ips[0].address, "a.b.c.d/len").
pub fn result_ip(result: &serde_json::Value) -> Option<Ipv4Addr> {
    result["ips"][0]["address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// What survives a daemon restart for one pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PodRecord {
    ident: PodIdent,
    netns: String,
    ip: Ipv4Addr,
    spec: serde_json::Value,
    pids: Vec<i32>,
}

/// A port server thread and its stop flag.
struct Server {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

enum Proc {
    Child(Child),
    /// A process started by a previous daemon run (not our child).
    Adopted(i32),
}

impl Proc {
    fn pid(&self) -> i32 {
        match self {
            Proc::Child(c) => c.id() as i32,
            Proc::Adopted(p) => *p,
        }
    }
}

struct RunningPod {
    record: PodRecord,
    servers: Vec<Server>,
    procs: Vec<Proc>,
}

struct PendingPod {
    pod: Pod,
    attempts: u32,
    next_try: Instant,
    last_error: String,
}

fn spec_of(pod: &Pod) -> serde_json::Value {
    serde_json::to_value(&pod.spec).unwrap_or(serde_json::Value::Null)
}

fn ident_of(pod: &Pod) -> PodIdent {
    PodIdent {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

type PodKey = (String, String);

/// One node's runtime.
pub struct Runtime {
    cfg: RuntimeConfig,
    cp: ControlPlane,
    running: HashMap<PodKey, RunningPod>,
    pending: HashMap<PodKey, PendingPod>,
    /// A CNI DEL failed (agent down): run CNI GC again so the address does not leak.
    gc_wanted: std::cell::Cell<bool>,
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig, cp: ControlPlane) -> Self {
        Self {
            cfg,
            cp,
            running: HashMap::new(),
            pending: HashMap::new(),
            gc_wanted: std::cell::Cell::new(false),
        }
    }

    /// Watches the control plane until `stop` is set. Pods keep running when it returns (their
    /// namespaces and processes stay), so a restarted runtime can adopt them.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), RuntimeError> {
        self.write_conflist()?;
        let events = self.cp.subscribe();
        let mut listing: Option<Vec<String>> = Some(Vec::new());
        // CNI GC after the first complete listing (as containerd does at start), retried until
        // the agent answers.
        let mut gc_due: Option<Instant> = None;
        // Until that GC is done the runtime does not report, so `lab up` (which waits for the
        // report) never returns while a GC could still collect attachments made after it, such
        // as a container a CRI runtime started on the node.
        let mut held_report: Option<u64> = None;
        while !stop.load(Ordering::Relaxed) {
            match events.recv_timeout(TICK) {
                Ok(WatchEvent::Upsert {
                    object: Object::Pod(pod),
                }) => {
                    if let Some(uids) = listing.as_mut() {
                        uids.push(ident_of(&pod).uid);
                    }
                    self.on_pod(pod);
                }
                Ok(WatchEvent::Delete {
                    object: Object::Pod(pod),
                }) => {
                    let ident = ident_of(&pod);
                    self.forget(&(ident.namespace, ident.name));
                }
                Ok(WatchEvent::Synced { revision }) => {
                    if let Some(uids) = listing.take() {
                        self.collect_orphans(&uids);
                        gc_due = Some(Instant::now());
                    }
                    if gc_due.is_some() {
                        held_report = Some(revision);
                    } else {
                        self.report(revision);
                    }
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RuntimeError::WatchEnded {
                        node: self.cfg.node.clone(),
                    });
                }
            }
            if self.gc_wanted.take() && gc_due.is_none() {
                gc_due = Some(Instant::now() + GC_RETRY);
            }
            if gc_due.is_some_and(|due| Instant::now() >= due) {
                gc_due = self.garbage_collect().err().map(|e| {
                    warn!(node = %self.cfg.node, error = %e, "CNI GC failed; retrying");
                    Instant::now() + GC_RETRY
                });
                if gc_due.is_none()
                    && let Some(revision) = held_report.take()
                {
                    self.report(revision);
                }
            }
            self.retry_pending();
            self.reap();
        }
        for pod in self.running.values_mut() {
            stop_servers(&mut pod.servers);
        }
        Ok(())
    }

    /// Releases every address the node's agent holds for a sandbox this runtime does not have.
    fn garbage_collect(&self) -> Result<(), CniFailure> {
        let valid: Vec<String> = self
            .running
            .values()
            .map(|p| p.record.ident.container_id())
            .chain(
                self.pending
                    .values()
                    .map(|p| ident_of(&p.pod).container_id()),
            )
            .collect();
        run_cni_gc(&self.cfg, &valid)?;
        info!(node = %self.cfg.node, valid = valid.len(), "CNI GC done");
        Ok(())
    }

    fn write_conflist(&self) -> Result<(), RuntimeError> {
        let path = self.cfg.conflist_path();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let text = serde_json::to_string_pretty(&conflist(
                &self.cfg.paths.agent_socket(&self.cfg.node),
            ))?;
            std::fs::write(&path, text + "\n")?;
            std::fs::create_dir_all(self.cfg.records_dir())?;
            std::fs::create_dir_all(self.cfg.logs_dir())
        };
        write().map_err(|error| RuntimeError::Write {
            node: self.cfg.node.clone(),
            path: path.display().to_string(),
            error,
        })
    }

    fn report(&self, revision: u64) {
        let message = if self.pending.is_empty() {
            format!("{} pods running", self.running.len())
        } else {
            format!(
                "{} pods running, {} waiting for their network",
                self.running.len(),
                self.pending.len()
            )
        };
        self.cp.report(
            &format!("runtime/{}", self.cfg.node),
            AgentReport {
                node: self.cfg.node.clone(),
                ready: true,
                realized_revision: revision,
                message,
            },
        );
    }

    fn on_pod(&mut self, pod: Pod) {
        let ident = ident_of(&pod);
        let key = (ident.namespace.clone(), ident.name.clone());
        let ours = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.cfg.node);
        if !ours {
            // Not (or no longer) scheduled here.
            self.forget(&key);
            return;
        }
        let spec = spec_of(&pod);
        if let Some(running) = self.running.get(&key) {
            if running.record.ident.uid == ident.uid && running.record.spec == spec {
                return; // a status update or an unchanged re-apply
            }
            info!(pod = %ident.name, namespace = %ident.namespace, "pod spec changed; restarting it");
            self.forget(&key);
        }
        if let Some(pending) = self.pending.get_mut(&key)
            && ident_of(&pending.pod).uid == ident.uid
            && spec_of(&pending.pod) == spec
        {
            return;
        }
        self.pending.remove(&key);
        if self.try_adopt(&pod, &ident, &spec) {
            return;
        }
        self.start(pod, 0);
    }

    /// Takes over a pod started by a previous daemon run: record, namespace and IP still match.
    fn try_adopt(&mut self, pod: &Pod, ident: &PodIdent, spec: &serde_json::Value) -> bool {
        let path = self.cfg.record_path(&ident.uid);
        let Some(record) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<PodRecord>(&t).ok())
        else {
            return false;
        };
        let status_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        let matches = record.ident == *ident
            && record.spec == *spec
            && fabric::netns_exists(&record.netns)
            && status_ip == Some(record.ip.to_string().as_str());
        if !matches {
            info!(pod = %ident.name, "leftover of an earlier run does not match; recreating");
            self.teardown_record(&record);
            return false;
        }
        let netns_pids = fabric::processes_in_netns(std::slice::from_ref(&record.netns));
        let procs: Vec<Proc> = record
            .pids
            .iter()
            .filter(|p| netns_pids.contains(p) && fabric::process_alive(**p))
            .map(|p| Proc::Adopted(*p))
            .collect();
        let mut running = RunningPod {
            record,
            servers: Vec::new(),
            procs,
        };
        // Port servers were threads of the previous daemon: serve again. Commands that died
        // with it are started again.
        match serve_ports(pod, &running.record.netns) {
            Ok(servers) => running.servers = servers,
            Err(e) => warn!(pod = %ident.name, error = %e, "cannot serve ports of adopted pod"),
        }
        if running.procs.is_empty() {
            running.procs = self.start_commands(pod, &running.record.netns);
        }
        running.record.pids = running.procs.iter().map(Proc::pid).collect();
        self.save_record(&running.record);
        info!(pod = %ident.name, namespace = %ident.namespace, ip = %running.record.ip, "adopted running pod");
        self.running
            .insert((ident.namespace.clone(), ident.name.clone()), running);
        true
    }

    /// Creates the pod's namespace, runs CNI ADD, writes the status, serves ports, runs commands.
    fn start(&mut self, pod: Pod, attempts: u32) {
        let ident = ident_of(&pod);
        let key = (ident.namespace.clone(), ident.name.clone());
        let netns = self.cfg.paths.pod_netns(&ident.uid);
        let running = self.running.len();
        let max_pods = self.cfg.max_pods as usize;
        let node = self.cfg.node.clone();
        let result = (|| -> Result<Ipv4Addr, CniFailure> {
            if running >= max_pods {
                return Err(CniFailure {
                    code: None,
                    message: format!(
                        "node {node} already runs {running} pods, its max pods is {max_pods}: \
                         the pod waits until a pod on this node is deleted"
                    ),
                });
            }
            if !fabric::netns_exists(&netns) {
                fabric::add_netns(&netns).map_err(|e| CniFailure {
                    code: None,
                    message: format!("cannot create pod netns {netns}: {e}"),
                })?;
            }
            let result = run_cni(&self.cfg, "ADD", &ident, &netns)?;
            result_ip(&result).ok_or_else(|| CniFailure {
                code: None,
                message: format!("{CNI_PLUGIN} ADD returned no IPv4 address: {result}"),
            })
        })();
        match result {
            Ok(ip) => {
                let mut record = PodRecord {
                    ident: ident.clone(),
                    netns: netns.clone(),
                    ip,
                    spec: spec_of(&pod),
                    pids: Vec::new(),
                };
                let servers = match serve_ports(&pod, &netns) {
                    Ok(servers) => servers,
                    Err(e) => {
                        warn!(pod = %ident.name, error = %e, "cannot serve a declared port");
                        Vec::new()
                    }
                };
                let procs = self.start_commands(&pod, &netns);
                record.pids = procs.iter().map(Proc::pid).collect();
                self.save_record(&record);
                self.set_status(&ident, running_status(&pod, ip, self.cfg.host_ip));
                info!(pod = %ident.name, namespace = %ident.namespace, %ip, "pod running");
                self.running.insert(
                    key,
                    RunningPod {
                        record,
                        servers,
                        procs,
                    },
                );
            }
            Err(failure) => {
                let attempts = attempts + 1;
                // "Try again later" means the agent is starting: retry soon. Anything else
                // backs off harder.
                let base = if failure.code == Some(CNI_TRY_AGAIN) {
                    250
                } else {
                    1000
                };
                let delay = Duration::from_millis((base << attempts.min(5)).min(10_000));
                let message = failure.to_string();
                let changed = self
                    .pending
                    .get(&key)
                    .is_none_or(|p| p.last_error != message);
                if changed {
                    warn!(pod = %ident.name, namespace = %ident.namespace, error = %message, "pod network setup failed; will retry");
                    self.set_status(&ident, waiting_status(&pod, self.cfg.host_ip, &message));
                }
                self.pending.insert(
                    key,
                    PendingPod {
                        pod,
                        attempts,
                        next_try: Instant::now() + delay,
                        last_error: message,
                    },
                );
            }
        }
    }

    fn retry_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<PodKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next_try <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(p) = self.pending.get(&key) {
                let (pod, attempts) = (p.pod.clone(), p.attempts);
                self.start(pod, attempts);
            }
        }
    }

    /// Collects exited commands (they are our children) so they do not linger as zombies.
    fn reap(&mut self) {
        for pod in self.running.values_mut() {
            for proc in &mut pod.procs {
                if let Proc::Child(child) = proc
                    && let Ok(Some(status)) = child.try_wait()
                {
                    debug!(pod = %pod.record.ident.name, pid = child.id(), %status, "container command exited");
                }
            }
        }
    }

    fn set_status(&self, ident: &PodIdent, status: PodStatus) {
        if let Err(e) = self
            .cp
            .update_pod_status(&ident.namespace, &ident.name, status)
        {
            warn!(pod = %ident.name, namespace = %ident.namespace, error = %e, "cannot update pod status");
        }
    }

    fn start_commands(&self, pod: &Pod, netns: &str) -> Vec<Proc> {
        let ident = ident_of(pod);
        let mut procs = Vec::new();
        for container in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            let Some((program, rest)) = container.command.as_deref().and_then(|c| c.split_first())
            else {
                continue;
            };
            let log = self.cfg.logs_dir().join(format!(
                "{}_{}_{}.log",
                ident.namespace, ident.name, container.name
            ));
            let mut cmd = Command::new(program);
            cmd.args(rest)
                .args(container.args.iter().flatten())
                .stdin(Stdio::null())
                .process_group(0);
            for var in container.env.iter().flatten() {
                if let Some(value) = &var.value {
                    cmd.env(&var.name, value);
                }
            }
            if let Some(dir) = &container.working_dir {
                cmd.current_dir(dir);
            }
            match spawn_in_netns(cmd, netns, &log) {
                Ok(child) => {
                    info!(pod = %ident.name, container = %container.name, pid = child.id(), "container command started");
                    procs.push(Proc::Child(child));
                }
                Err(e) => {
                    warn!(pod = %ident.name, container = %container.name, error = %e, "cannot start container command")
                }
            }
        }
        procs
    }

    fn save_record(&self, record: &PodRecord) {
        let path = self.cfg.record_path(&record.ident.uid);
        let tmp = path.with_extension("json.tmp");
        let result = serde_json::to_vec(record)
            .map_err(std::io::Error::from)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot save pod record; a daemon restart will recreate the pod");
        }
    }

    /// Stops and removes a pod: servers, processes, CNI DEL, namespace, record.
    fn forget(&mut self, key: &PodKey) {
        if let Some(p) = self.pending.remove(key) {
            let ident = ident_of(&p.pod);
            let netns = self.cfg.paths.pod_netns(&ident.uid);
            self.cni_del_and_remove(&ident, &netns);
        }
        if let Some(mut pod) = self.running.remove(key) {
            stop_servers(&mut pod.servers);
            stop_procs(&mut pod.procs);
            self.cni_del_and_remove(&pod.record.ident, &pod.record.netns);
            let _ = std::fs::remove_file(self.cfg.record_path(&pod.record.ident.uid));
            info!(pod = %pod.record.ident.name, namespace = %pod.record.ident.namespace, "pod removed");
        }
    }

    fn teardown_record(&self, record: &PodRecord) {
        let mut procs: Vec<Proc> = record
            .pids
            .iter()
            .filter(|p| fabric::process_alive(**p))
            .map(|p| Proc::Adopted(*p))
            .collect();
        stop_procs(&mut procs);
        self.cni_del_and_remove(&record.ident, &record.netns);
        let _ = std::fs::remove_file(self.cfg.record_path(&record.ident.uid));
    }

    fn cni_del_and_remove(&self, ident: &PodIdent, netns: &str) {
        // DEL is idempotent; retry briefly while the agent is restarting.
        for attempt in 0..5 {
            match run_cni(&self.cfg, "DEL", ident, netns) {
                Ok(_) => break,
                Err(f) if f.code == Some(CNI_TRY_AGAIN) && attempt < 4 => {
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
                Err(f) => {
                    warn!(pod = %ident.name, error = %f, "CNI DEL failed; CNI GC will release the address");
                    self.gc_wanted.set(true);
                    break;
                }
            }
        }
        // Anything left in the pod namespace (e.g. from `ferrum exec`) goes with it.
        let left = fabric::processes_in_netns(&[netns.to_string()]);
        fabric::terminate(&left, Duration::from_secs(2));
        if let Err(e) = fabric::delete_netns(netns) {
            warn!(netns, error = %e, "cannot delete pod netns");
        }
    }

    /// After the first listing: pods recorded by an earlier run that no longer exist here.
    fn collect_orphans(&mut self, listed_uids: &[String]) {
        let Ok(entries) = std::fs::read_dir(self.cfg.records_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(record) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| serde_json::from_str::<PodRecord>(&t).ok())
            else {
                continue;
            };
            let key = (record.ident.namespace.clone(), record.ident.name.clone());
            let live = listed_uids.contains(&record.ident.uid)
                && self
                    .running
                    .get(&key)
                    .is_some_and(|r| r.record.ident.uid == record.ident.uid);
            if !live && !self.pending.contains_key(&key) {
                info!(pod = %record.ident.name, "removing pod deleted while the runtime was down");
                self.teardown_record(&record);
            }
        }
    }
}

/// The current time as a Kubernetes timestamp (whole seconds, as the API server stores them).
pub fn now() -> Time {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    Time(Timestamp::from_second(secs).unwrap_or_default())
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, message: Option<&str>) -> PodCondition {
    PodCondition {
        type_: kind.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        last_transition_time: Some(now()),
        reason: reason.map(str::to_string),
        message: message.map(str::to_string),
        ..Default::default()
    }
}

/// The status kubelet would write for a started pod (no readiness probes yet: Ready at start).
pub fn running_status(pod: &Pod, ip: Ipv4Addr, host_ip: Ipv4Addr) -> PodStatus {
    let started = now();
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            ready: true,
            started: Some(true),
            restart_count: 0,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started.clone()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.to_string()),
        pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
        host_ip: Some(host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: host_ip.to_string(),
        }]),
        start_time: Some(started),
        conditions: Some(vec![
            condition("PodScheduled", true, None, None),
            condition("Initialized", true, None, None),
            condition("ContainersReady", true, None, None),
            condition("Ready", true, None, None),
        ]),
        container_statuses: Some(containers),
        ..Default::default()
    }
}

/// The status of a pod whose sandbox network could not be set up (yet).
pub fn waiting_status(pod: &Pod, host_ip: Ipv4Addr, message: &str) -> PodStatus {
    let _ = pod;
    PodStatus {
        phase: Some("Pending".into()),
        host_ip: Some(host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: host_ip.to_string(),
        }]),
        conditions: Some(vec![
            condition("PodScheduled", true, None, None),
            condition(
                "Ready",
                false,
                Some("FailedCreatePodSandBox"),
                Some(&format!("network setup failed: {message}")),
            ),
        ]),
        ..Default::default()
    }
}

/// Spawns `cmd` with its network namespace set to the named one, stdout/stderr appended to `log`.
pub fn spawn_in_netns(mut cmd: Command, netns: &str, log: &Path) -> std::io::Result<Child> {
    command_in_netns(&mut cmd, &fabric::netns_path(netns)).map_err(std::io::Error::other)?;
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdout(out.try_clone()?).stderr(out);
    cmd.spawn()
}

fn stop_servers(servers: &mut Vec<Server>) {
    for s in servers.iter() {
        s.stop.store(true, Ordering::Relaxed);
    }
    for s in servers.drain(..) {
        let _ = s.thread.join();
    }
}

fn stop_procs(procs: &mut Vec<Proc>) {
    // Each command leads its own process group: signal the group so its children go too.
    for p in procs.iter() {
        let _ = killpg(Pid::from_raw(p.pid()), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let alive = |p: &mut Proc| match p {
        Proc::Child(c) => matches!(c.try_wait(), Ok(None)),
        Proc::Adopted(pid) => fabric::process_alive(*pid),
    };
    while procs.iter_mut().any(alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut() {
        if alive(p) {
            let _ = killpg(Pid::from_raw(p.pid()), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(p.pid()), Signal::SIGKILL);
        }
        if let Proc::Child(c) = p {
            let _ = c.wait();
        }
    }
    procs.clear();
}

/// Declared ports of all containers: (port, protocol).
fn declared_ports(pod: &Pod) -> Vec<(u16, String)> {
    let mut ports: BTreeMap<(u16, String), ()> = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        for p in c.ports.iter().flatten() {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            if let Ok(port) = u16::try_from(p.container_port) {
                ports.insert((port, proto), ());
            }
        }
    }
    ports.into_keys().collect()
}

/// Starts one server thread per declared port inside the pod's namespace. Binding happens
/// before this returns, so a client can connect as soon as the pod is reported Running.
fn serve_ports(pod: &Pod, netns: &str) -> std::io::Result<Vec<Server>> {
    let name = ident_of(pod).name;
    let mut servers = Vec::new();
    let mut first_error = None;
    for (port, proto) in declared_ports(pod) {
        match serve_port(&name, netns, port, &proto) {
            Ok(server) => servers.push(server),
            Err(e) => {
                first_error.get_or_insert(std::io::Error::new(
                    e.kind(),
                    format!("{proto} port {port}: {e}"),
                ));
            }
        }
    }
    match first_error {
        Some(e) if servers.is_empty() => Err(e),
        Some(e) => {
            warn!(pod = %name, error = %e, "a declared port is not served");
            Ok(servers)
        }
        None => Ok(servers),
    }
}

fn serve_port(pod_name: &str, netns: &str, port: u16, proto: &str) -> std::io::Result<Server> {
    let ns = File::open(fabric::netns_path(netns))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let reply = format!("{pod_name}\n").into_bytes();
    let proto = proto.to_string();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("{pod_name}-{port}"))
        .spawn(move || {
            if let Err(e) = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(std::io::Error::other(format!("setns: {e}"))));
                return;
            }
            drop(ns);
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            match proto.as_str() {
                "TCP" => match TcpListener::bind(addr) {
                    Ok(listener) => {
                        let _ = ready_tx.send(Ok(()));
                        serve_tcp(listener, &reply, &thread_stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
                "UDP" => match UdpSocket::bind(addr) {
                    Ok(socket) => {
                        let _ = ready_tx.send(Ok(()));
                        serve_udp(socket, &reply, &thread_stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
                other => {
                    let _ = ready_tx.send(Err(std::io::Error::other(format!(
                        "protocol {other} is not supported by the lab runtime"
                    ))));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Server { stop, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(std::io::Error::other("port server thread ended early"))
        }
    }
}

/// Waits until `fd` is readable or TICK passes.
fn readable(fd: &impl AsFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, TICK.as_millis() as libc::c_int) };
    n > 0
}

fn serve_tcp(listener: TcpListener, reply: &[u8], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(&listener) {
            continue;
        }
        if let Ok((mut conn, _)) = listener.accept() {
            let _ = conn.write_all(reply);
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
    }
}

fn serve_udp(socket: UdpSocket, reply: &[u8], stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if !readable(&socket) {
            continue;
        }
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(reply, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_config_carries_list_version_and_name() {
        let list = conflist(Path::new("/run/x/agent.sock"));
        assert_eq!(list["plugins"][0]["type"], CNI_PLUGIN);
        let cfg = plugin_config(&list);
        assert_eq!(
            cfg,
            serde_json::json!({"cniVersion": "1.1.0", "name": "ferrum", "type": "ferrum-cni",
                "agentSocket": "/run/x/agent.sock"})
        );
    }

    #[test]
    fn result_ip_reads_first_address() {
        let r = serde_json::json!({"cniVersion": "1.1.0",
            "ips": [{"address": "10.244.0.5/32", "gateway": "169.254.1.1"}]});
        assert_eq!(result_ip(&r), Some(Ipv4Addr::new(10, 244, 0, 5)));
        assert_eq!(result_ip(&serde_json::json!({"ips": []})), None);
    }

    #[test]
    fn container_id_is_uid_without_dashes() {
        let p = PodIdent {
            namespace: "default".into(),
            name: "a".into(),
            uid: "1234-abcd".into(),
        };
        assert_eq!(p.container_id(), "1234abcd");
    }

    #[test]
    fn declared_ports_default_to_tcp_and_dedupe() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [
                {"name": "c1", "ports": [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}]},
                {"name": "c2", "ports": [{"containerPort": 80, "protocol": "TCP"}]}
            ]}
        }))
        .unwrap();
        assert_eq!(
            declared_ports(&pod),
            vec![(53, "UDP".to_string()), (80, "TCP".to_string())]
        );
    }
}
