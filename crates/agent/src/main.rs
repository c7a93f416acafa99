//! ferrum-agent: the per-node agent. Thin: parse, log, enter the netns, connect the cluster
//! source, and hand over to the library.

use anyhow::Context;
use clap::Parser;
use ferrum_agent::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() {
    // Tools share the binary (the DaemonSet's init steps run the agent image).
    if std::env::args()
        .nth(1)
        .is_some_and(|a| ferrum_agent::tools::TOOLS.contains(&a.as_str()))
    {
        let tool = ferrum_agent::tools::Tool::parse();
        init_logging(LogFormat::Text);
        if let Err(e) = ferrum_agent::tools::run(tool) {
            eprintln!("ferrum-agent: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let config = Config::parse();
    init_logging(config.log_format);
    if let Err(e) = run(&config) {
        tracing::error!("ferrum-agent failed: {e:#}");
        eprintln!("ferrum-agent: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    // Before any thread exists, so every thread the agent starts lives in the node's netns.
    if let Some(netns) = &config.netns {
        ferrum_datapath::netns::enter_netns(netns)
            .with_context(|| format!("entering the network namespace {}", netns.display()))?;
    }
    if config.kubeconfig.is_some() || config.in_cluster {
        // VNet mode: the node's addresses are batches of the cluster's FerrumIPPool, passed
        // to the agent as the same NodeNetworkConfig the lab's cloud writes.
        let vnet = (config.ipam_mode == ferrum_agent::config::IpamMode::Vnet).then_some(
            ferrum_k8s::vnet::VnetOptions {
                pod_subnet: config.cluster_pod_cidr,
                max_pods: config.max_pods,
            },
        );
        let source = ferrum_k8s::KubeSource::connect_with(
            config.kubeconfig.as_deref(),
            &config.node_name,
            vnet,
        )
        .context("connecting to the Kubernetes API server")?;
        let agent = ferrum_agent::start(config, Box::new(source))?;
        return agent.wait();
    }
    let lab_socket = config
        .lab_socket
        .as_ref()
        .context("no cluster source: pass --kubeconfig PATH or --in-cluster (Kubernetes), or --lab-socket (lab)")?;
    let source =
        ferrum_lab::client::LabSource::connect(lab_socket, &format!("agent/{}", config.node_name))
            .with_context(|| {
                format!(
                    "connecting to the lab control plane at {}",
                    lab_socket.display()
                )
            })?;
    let agent = ferrum_agent::start(config, Box::new(source))?;
    agent.wait()
}
