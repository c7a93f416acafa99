//! `ferrum lab up|down|status|daemon` and `ferrum exec`.

use ferrum_datapath::netns::command_in_netns;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use ferrum_lab::client::LabClient;
use ferrum_lab::daemon::{self, AGENT_BINARY, CNI_BINARY};
use ferrum_lab::fabric;
use ferrum_lab::network_profile::{self as np, EXTERNAL_IP, NetworkPluginMode, NetworkProfile};
use ferrum_lab::profile::LabPaths;
use ferrum_model::{AgentReport, Kind, Object, ObjectRef};

const UP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of nodes (1-64).
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// overlay (pods get addresses from --pod-cidr, VXLAN between nodes) or vnet.
    #[arg(long, default_value = "overlay")]
    pub network_plugin_mode: String,
    /// Cluster pod CIDR; each node gets the next /24 of it (overlay mode).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub pod_cidr: String,
    #[arg(long, default_value = "10.0.0.0/16")]
    pub service_cidr: String,
    #[arg(long, default_value = "10.0.0.10")]
    pub dns_service_ip: String,
    /// Maximum pods per node (10-250; default 250 overlay, 110 vnet).
    #[arg(long)]
    pub max_pods: Option<u32>,
    /// The lab's virtual network; the node subnet must be inside it.
    #[arg(long, default_value = "10.224.0.0/12")]
    pub vnet_cidr: String,
    /// The node subnet; node i gets address .(10+i), the fabric router .1.
    #[arg(long, default_value = "10.224.0.0/16")]
    pub node_subnet: String,
    /// VNet mode only: the subnet pods take addresses from.
    #[arg(long)]
    pub pod_subnet: Option<String>,
    /// Pool of LoadBalancer ingress IPs (routed by the fabric to the nodes).
    #[arg(long, default_value = "198.51.100.0/24")]
    pub lb_pool: String,
    /// Default Service load-balancing algorithm: random or maglev (per Service: annotation
    /// ferrum.io/lb-algorithm).
    #[arg(long, default_value = "random")]
    pub lb_algorithm: String,
    /// VNet mode: addresses a node receives per batch.
    #[arg(long, default_value_t = np::DEFAULT_IP_BATCH_SIZE)]
    pub ip_batch_size: u32,
    /// VNet mode: request a batch when fewer than this percent of a batch is free.
    #[arg(long, default_value_t = np::DEFAULT_IP_REQUEST_THRESHOLD_PERCENT)]
    pub ip_request_threshold_percent: u32,
    /// VNet mode: release a batch when more than this percent of a batch is free.
    #[arg(long, default_value_t = np::DEFAULT_IP_RELEASE_THRESHOLD_PERCENT)]
    pub ip_release_threshold_percent: u32,
}

#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    /// A larger overlay pod CIDR containing the current one.
    #[arg(long)]
    pub pod_cidr: String,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Output format: json (default: a table).
    #[arg(short = 'o', long = "output")]
    pub output: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// The pod's namespace.
    #[arg(short = 'n', long = "namespace", default_value = "default")]
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The command and its arguments (after `--`), passed through untouched.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl UpArgs {
    fn profile(&self) -> Result<NetworkProfile> {
        let mode = self.network_plugin_mode.parse::<NetworkPluginMode>()?;
        let profile = NetworkProfile {
            network_plugin_mode: mode,
            nodes: self.nodes,
            pod_cidr: np::parse_cidr("pod-cidr", &self.pod_cidr)?,
            service_cidr: np::parse_cidr("service-cidr", &self.service_cidr)?,
            dns_service_ip: np::parse_ip("dns-service-ip", &self.dns_service_ip)?,
            max_pods: self
                .max_pods
                .unwrap_or_else(|| NetworkProfile::default_max_pods(mode)),
            vnet_cidr: np::parse_cidr("vnet-cidr", &self.vnet_cidr)?,
            node_subnet: np::parse_cidr("node-subnet", &self.node_subnet)?,
            pod_subnet: self
                .pod_subnet
                .as_deref()
                .map(|s| np::parse_cidr("pod-subnet", s))
                .transpose()?,
            lb_pool: np::parse_cidr("lb-pool", &self.lb_pool)?,
            lb_algorithm: self.lb_algorithm.clone(),
            ip_batch_size: self.ip_batch_size,
            ip_request_threshold_percent: self.ip_request_threshold_percent,
            ip_release_threshold_percent: self.ip_release_threshold_percent,
        };
        profile.validate()?;
        Ok(profile)
    }
}

fn lab_paths(name: &str) -> Result<LabPaths> {
    Ok(LabPaths::new(name)?)
}

pub fn up(name: &str, args: UpArgs) -> Result<()> {
    let profile = args.profile()?;
    let paths = lab_paths(name)?;
    if paths.state_dir.exists()
        || paths.run_dir.exists()
        || !fabric::list_netns(&paths.netns_prefix()).is_empty()
    {
        bail!(
            "lab {name:?} already exists (or has leftovers); remove it first with `ferrum --name {name} lab down`"
        );
    }
    let bin = daemon::bin_dir();
    for b in [AGENT_BINARY, CNI_BINARY] {
        if !bin.join(b).exists() {
            bail!(
                "{b} not found in {} (it must sit next to ferrum; build the workspace or set FERRUM_BIN_DIR)",
                bin.display()
            );
        }
    }
    let started = Instant::now();
    match build(&paths, &profile) {
        Ok(()) => {
            print_summary(&paths, &profile, started.elapsed());
            Ok(())
        }
        Err(e) => {
            eprintln!("lab up failed; removing what was created");
            if let Err(te) = fabric::teardown(&paths) {
                eprintln!("warning: cleanup after the failure also failed: {te}");
            }
            Err(e)
        }
    }
}

fn build(paths: &LabPaths, profile: &NetworkProfile) -> Result<()> {
    for dir in [&paths.state_dir, &paths.run_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    profile.save(&daemon::profile_path(paths))?;
    fabric::build(paths, profile).context("building the lab network")?;
    let mut child = spawn_daemon(paths)?;
    wait_ready(paths, profile, &mut child)
}

fn spawn_daemon(paths: &LabPaths) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the ferrum executable")?;
    let log_path = paths.state_dir.join("daemon.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--name", &paths.name, "lab", "daemon"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Detach from our session so the daemon outlives this command and its terminal.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the lab daemon")?;
    std::fs::write(fabric::daemon_pid_file(paths), format!("{}\n", child.id()))
        .context("writing the daemon pid file")?;
    Ok(child)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Nodes whose agent is not ready or whose runtime has not reported yet, with why.
fn lagging(profile: &NetworkProfile, reports: &BTreeMap<String, AgentReport>) -> Vec<String> {
    let mut out = Vec::new();
    for node in profile.node_names() {
        match reports.get(&format!("agent/{node}")) {
            Some(r) if r.ready => {}
            Some(r) => out.push(format!("{node}: agent not ready ({})", r.message)),
            None => out.push(format!("{node}: agent has not reported")),
        }
        if !reports.contains_key(&format!("runtime/{node}")) {
            out.push(format!("{node}: runtime has not reported"));
        }
    }
    out
}

fn wait_ready(paths: &LabPaths, profile: &NetworkProfile, daemon: &mut Child) -> Result<()> {
    let deadline = Instant::now() + UP_TIMEOUT;
    let log = paths.state_dir.join("daemon.log");
    let client = LabClient::new(paths.cp_socket().as_path());
    let mut last = vec!["control plane not reachable yet".to_string()];
    loop {
        if let Some(status) = daemon.try_wait().context("checking the lab daemon")? {
            bail!(
                "the lab daemon exited ({status}); last lines of {}:\n{}",
                log.display(),
                tail(&log, 20)
            );
        }
        if let Ok(reports) = client.reports() {
            last = lagging(profile, &reports);
            if last.is_empty() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = profile
                .node_names()
                .iter()
                .map(|n| daemon::agent_log(paths, n).display().to_string())
                .collect();
            bail!(
                "the lab was not ready after {UP_TIMEOUT:?}:\n  {}\nlogs: {} {}",
                last.join("\n  "),
                log.display(),
                logs.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn print_summary(paths: &LabPaths, profile: &NetworkProfile, took: Duration) {
    println!(
        "lab {:?} is up in {:.1}s: {} nodes, {} mode, pod addresses from {}, service CIDR {}",
        paths.name,
        took.as_secs_f64(),
        profile.nodes,
        profile.network_plugin_mode,
        profile.pod_range(),
        profile.service_cidr
    );
    for (i, node) in profile.node_names().iter().enumerate() {
        let i = i as u32;
        println!(
            "  {node}  ip {}  podCIDR {}  netns {}",
            profile.node_ip(i),
            match profile.network_plugin_mode {
                NetworkPluginMode::Overlay => profile.node_pod_cidr(i).to_string(),
                NetworkPluginMode::Vnet => format!("- (batches from {})", profile.pod_range()),
            },
            paths.node_netns(node)
        );
    }
    println!(
        "  external host {EXTERNAL_IP}  netns {}",
        paths.external_netns()
    );
    println!(
        "next: `ferrum apply -f pods.yaml`, `ferrum get pods -o wide`; remove with `ferrum --name {} lab down`",
        paths.name
    );
}

pub fn down(name: &str) -> Result<()> {
    let paths = lab_paths(name)?;
    let summary = fabric::teardown(&paths).with_context(|| format!("removing lab {name:?}"))?;
    if summary == fabric::TeardownSummary::default() && !paths.state_dir.exists() {
        println!("lab {name:?} removed (nothing was left)");
    } else {
        println!(
            "lab {name:?} removed: daemon {}, {} processes stopped, {} namespaces deleted",
            if summary.daemon_stopped {
                "stopped"
            } else {
                "was not running"
            },
            summary.processes_killed,
            summary.netns_deleted.len()
        );
    }
    Ok(())
}

pub fn status(name: &str, args: StatusArgs) -> Result<()> {
    let paths = lab_paths(name)?;
    let profile_file = daemon::profile_path(&paths);
    if !profile_file.exists() {
        bail!("lab {name:?} does not exist (create it with `ferrum --name {name} lab up`)");
    }
    let profile = NetworkProfile::load(&profile_file)?;
    let daemon_pid = fabric::read_pid_file(&fabric::daemon_pid_file(&paths))
        .filter(|p| fabric::is_lab_daemon(&paths, *p));
    let reports = LabClient::new(paths.cp_socket().as_path())
        .reports()
        .unwrap_or_default();
    let nodes: Vec<serde_json::Value> = profile
        .node_names()
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let i = i as u32;
            let agent_pid = fabric::read_pid_file(&daemon::agent_pid_file(&paths, node))
                .filter(|p| fabric::process_alive(*p));
            json!({
                "name": node,
                "netns": paths.node_netns(node),
                "ip": profile.node_ip(i).to_string(),
                "podCIDR": (profile.network_plugin_mode == NetworkPluginMode::Overlay)
                    .then(|| profile.node_pod_cidr(i).to_string()),
                "ready": reports.get(&format!("agent/{node}")).is_some_and(|r| r.ready),
                "agentPid": agent_pid,
                // Reachable from inside the node's netns (and the fabric).
                "metrics": format!("http://{}:{}/metrics", profile.node_ip(i), daemon::OBSERVE_PORT),
                "serviceMap": format!("http://{}:{}/", profile.node_ip(i), daemon::OBSERVE_PORT),
                "observeSocket": paths.observe_socket(node),
            })
        })
        .collect();
    let doc = json!({
        "name": paths.name,
        "profile": profile,
        "daemon": { "running": daemon_pid.is_some(), "pid": daemon_pid,
                    "socket": paths.cp_socket() },
        "nodes": nodes,
        "external": { "netns": paths.external_netns(), "ip": EXTERNAL_IP.to_string() },
        // The cloud network: the bridge every node's uplink is on, and its routes.
        "fabric": { "netns": paths.fabric_netns() },
    });
    match args.output.as_deref() {
        Some("json") => println!("{}", serde_json::to_string_pretty(&doc)?),
        None | Some("wide") => {
            println!(
                "lab {}  mode {}  pod CIDR {}  service CIDR {}  dns {}  max pods {}  daemon {}",
                paths.name,
                profile.network_plugin_mode,
                profile.pod_cidr,
                profile.service_cidr,
                profile.dns_service_ip,
                profile.max_pods,
                daemon_pid.map_or("not running".to_string(), |p| format!("pid {p}"))
            );
            println!(
                "{:<10} {:<7} {:<15} {:<18} {:<10} NETNS",
                "NODE", "READY", "IP", "POD-CIDR", "AGENT-PID"
            );
            for n in &nodes {
                println!(
                    "{:<10} {:<7} {:<15} {:<18} {:<10} {}",
                    n["name"].as_str().unwrap_or_default(),
                    n["ready"].to_string(),
                    n["ip"].as_str().unwrap_or_default(),
                    n["podCIDR"].as_str().unwrap_or_default(),
                    n["agentPid"].to_string(),
                    n["netns"].as_str().unwrap_or_default()
                );
            }
            println!(
                "external   {:<7} {:<15} {:<18} {:<10} {}",
                "-",
                EXTERNAL_IP,
                "-",
                "-",
                paths.external_netns()
            );
            println!(
                "fabric     {:<7} {:<15} {:<18} {:<10} {}",
                "-",
                "-",
                "-",
                "-",
                paths.fabric_netns()
            );
            println!(
                "metrics and service map: http://<node ip>:{}/metrics and / inside each node's netns",
                daemon::OBSERVE_PORT
            );
        }
        Some(other) => bail!("unknown output format {other:?}; use json"),
    }
    Ok(())
}

/// `lab update --pod-cidr`: validates, saves the profile, then restarts each node's agent so it
/// routes and accepts the larger CIDR (the datapath keeps forwarding meanwhile; agents adopt
/// their pods), and waits until every agent is back and ready.
pub fn update(name: &str, args: UpdateArgs) -> Result<()> {
    let paths = lab_paths(name)?;
    let profile_file = daemon::profile_path(&paths);
    if !profile_file.exists() {
        bail!("lab {name:?} does not exist (create it with `ferrum --name {name} lab up`)");
    }
    let profile = NetworkProfile::load(&profile_file)?;
    let larger = np::parse_cidr("pod-cidr", &args.pod_cidr)?;
    if larger == profile.pod_cidr {
        println!("lab {name:?}: pod CIDR is already {larger}; nothing changed");
        return Ok(());
    }
    let next = profile.with_pod_cidr(larger)?;
    next.save(&profile_file)?;
    let client = LabClient::new(paths.cp_socket().as_path());
    for node in next.node_names() {
        let pid_file = daemon::agent_pid_file(&paths, &node);
        let old = fabric::read_pid_file(&pid_file).filter(|p| {
            fabric::process_alive(*p) && fabric::process_cmdline(*p).contains(AGENT_BINARY)
        });
        if let Some(pid) = old {
            let left = fabric::terminate(&[pid], Duration::from_secs(5));
            if !left.is_empty() {
                bail!(
                    "the agent of {node} (pid {pid}) did not stop; the profile is saved, restart the lab daemon"
                );
            }
        }
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            let new = fabric::read_pid_file(&pid_file)
                .filter(|p| Some(*p) != old && fabric::process_alive(*p));
            let ready = client
                .reports()
                .ok()
                .and_then(|r| r.get(&format!("agent/{node}")).map(|r| r.ready))
                .unwrap_or(false);
            if new.is_some() && ready {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent of {node} did not come back ready after {UP_TIMEOUT:?}; see {}",
                    daemon::agent_log(&paths, &node).display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "lab {name:?}: pod CIDR expanded from {} to {larger}; nodes keep their blocks and pods their addresses",
        profile.pod_cidr
    );
    Ok(())
}

pub fn daemon(name: &str) -> Result<()> {
    let paths = lab_paths(name)?;
    init_daemon_logging();
    daemon::run(&paths).with_context(|| format!("lab {name:?} daemon"))
}

fn init_daemon_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn exec(name: &str, args: ExecArgs) -> Result<i32> {
    let paths = lab_paths(name)?;
    let client = LabClient::new(paths.cp_socket().as_path());
    let pod_ref = ObjectRef::new(Kind::Pod, Some(&args.namespace), &args.pod);
    let pod = match client.get(&pod_ref)? {
        Some(Object::Pod(p)) => p,
        _ => bail!(
            "pod {}/{} not found in lab {name:?} (list pods with `ferrum get pods -n {}`)",
            args.namespace,
            args.pod,
            args.namespace
        ),
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let netns = paths.pod_netns(&uid);
    let ns_path = fabric::netns_path(&netns);
    let (program, rest) = args
        .command
        .split_first()
        .context("no command given after --")?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    command_in_netns(&mut cmd, &ns_path).with_context(|| {
        format!(
            "pod {}/{} has no network namespace yet ({}); is it Running? (`ferrum get pods -n {}`)",
            args.namespace,
            args.pod,
            ns_path.display(),
            args.namespace
        )
    })?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {program:?} in pod {}/{}", args.namespace, args.pod))?;
    // Ctrl-C reaches the command (same process group); we stay to pass its exit code through.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait().context("waiting for the command")?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    })
}
