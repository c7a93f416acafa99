//! The agent binary's tools: the DaemonSet's init steps and the operator's helpers.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::install::{InstallCni, install_cni};

/// Names of the tools (the first argument that selects one).
pub const TOOLS: &[&str] = &["install-cni", "cleanup-kube-proxy", "crds"];

#[derive(Debug, Parser)]
#[command(name = "ferrum-agent", version)]
pub enum Tool {
    /// Install ferrum-cni and its conflist on the host (atomically).
    InstallCni(InstallCni),
    /// Remove kube-proxy's iptables chains and nftables tables from this node's network
    /// namespace (see README, "Migrate from kube-proxy").
    CleanupKubeProxy {
        /// Whether to do anything (the DaemonSet sets it from its ConfigMap).
        #[arg(long, env = "FERRUM_CLEANUP_KUBE_PROXY", default_value = "true", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        enabled: bool,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Clean up even though a kube-proxy process runs (it would recreate its rules).
        #[arg(long)]
        force: bool,
        /// The host's /proc, to find a running kube-proxy (mounted in the init container).
        #[arg(long, default_value = "/proc")]
        proc_root: PathBuf,
    },
    /// Print Ferrum's CustomResourceDefinitions (deploy/crds.yaml is this output).
    Crds,
}

pub fn run(tool: Tool) -> anyhow::Result<()> {
    match tool {
        Tool::InstallCni(args) => install_cni(&args),
        Tool::CleanupKubeProxy { enabled: false, .. } => {
            println!("kube-proxy cleanup disabled (FERRUM_CLEANUP_KUBE_PROXY=false)");
            Ok(())
        }
        Tool::CleanupKubeProxy {
            enabled: true,
            dry_run,
            force,
            proc_root,
        } => {
            let report = ferrum_k8s::kubeproxy::cleanup(dry_run, force, &proc_root)
                .context("cleaning up kube-proxy's rules")?;
            let verb = if dry_run { "would remove" } else { "removed" };
            if report.is_empty() {
                println!("no kube-proxy rules on this node");
            }
            for (backend, plan) in &report.iptables {
                println!(
                    "{verb} {backend} table {}: {} chains, {} jumps into them",
                    plan.table,
                    plan.chains.len(),
                    plan.jumps.len()
                );
            }
            for (family, table) in &report.nftables {
                println!("{verb} nftables table {family} {table}");
            }
            Ok(())
        }
        Tool::Crds => {
            print!(
                "{}",
                ferrum_k8s::crd::crd_yaml().context("generating the CRDs")?
            );
            Ok(())
        }
    }
}
