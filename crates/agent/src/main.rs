//! ferrum-agent: the per-node agent. Thin: parse, log, enter the netns, connect the cluster
//! source, and hand over to the library.

use anyhow::Context;
use clap::Parser;
use ferrum_agent::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() {
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
    let lab_socket = config
        .lab_socket
        .as_ref()
        .context("no cluster source: pass --lab-socket with the lab control plane's socket")?;
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
