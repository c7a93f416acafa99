//! CNI ADD/DEL latency: the real `ferrum-cni` run against a lab node's agent exactly as the lab
//! runtime (and containerd) runs it, for fresh pod namespaces.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use ferrum_lab::fabric::{add_netns, delete_netns};
use ferrum_lab::runtime::{PodIdent, RuntimeConfig, result_ip, run_cni};
use tracing::{debug, warn};

use super::check_interrupted;
use crate::Lab;

/// Per-invocation wall-clock times in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct CniTimings {
    pub add_ms: Vec<f64>,
    pub del_ms: Vec<f64>,
}

/// A pod namespace this phase created, with whether ADD succeeded (so DEL is still owed).
struct BenchPod {
    ident: PodIdent,
    netns: String,
    added: bool,
}

/// Owns the pods of the phase: whatever is still added or present on drop is DEL'd and its
/// namespace removed, even when the phase fails half-way.
struct BenchPods<'a> {
    cfg: &'a RuntimeConfig,
    pods: Vec<BenchPod>,
}

impl Drop for BenchPods<'_> {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            if pod.added
                && let Err(f) = run_cni(self.cfg, "DEL", &pod.ident, &pod.netns)
            {
                warn!(pod = %pod.ident.name, error = %f, "cleanup CNI DEL failed");
            }
            if let Err(e) = delete_netns(&pod.netns) {
                warn!(netns = %pod.netns, error = %e, "cannot delete pod namespace");
            }
        }
    }
}

/// Runs CNI ADD for `count` fresh pods on `node`, timing each invocation, then DEL for each.
pub fn measure(lab: &Lab, node: &str, count: usize) -> Result<CniTimings> {
    let cfg = RuntimeConfig {
        paths: lab.paths.clone(),
        node: node.to_string(),
        host_ip: lab.node_ip(node)?,
        bin_dir: crate::bin_dir(),
        max_pods: ferrum_lab::network_profile::MAX_MAX_PODS,
    };
    let mut pods = BenchPods {
        cfg: &cfg,
        pods: Vec::with_capacity(count),
    };
    let mut timings = CniTimings::default();
    let prefix = lab.paths.netns_prefix();
    let run_tag = std::process::id();
    for index in 0..count {
        check_interrupted()?;
        // Under the lab's prefix, so `lab down` also finds any leftover.
        let netns = format!("{prefix}bench{index}");
        add_netns(&netns).with_context(|| format!("cannot create pod namespace {netns}"))?;
        let ident = PodIdent {
            namespace: "bench".into(),
            name: format!("cni-{index}"),
            uid: format!("{run_tag:08x}-be7c-4000-8000-{index:012x}"),
        };
        pods.pods.push(BenchPod {
            ident: ident.clone(),
            netns: netns.clone(),
            added: false,
        });
        let start = Instant::now();
        let result = run_cni(&cfg, "ADD", &ident, &netns);
        let elapsed = start.elapsed();
        let result =
            result.map_err(|f| anyhow!("CNI ADD of bench pod {} failed: {f}", ident.name))?;
        if let Some(last) = pods.pods.last_mut() {
            last.added = true;
        }
        let ip: Option<Ipv4Addr> = result_ip(&result);
        ip.with_context(|| format!("CNI ADD of {} returned no IP: {result}", ident.name))?;
        debug!(pod = %ident.name, ?ip, ms = elapsed.as_secs_f64() * 1e3, "ADD");
        timings.add_ms.push(elapsed.as_secs_f64() * 1e3);
    }
    for pod in &mut pods.pods {
        check_interrupted()?;
        let start = Instant::now();
        let result = run_cni(&cfg, "DEL", &pod.ident, &pod.netns);
        let elapsed = start.elapsed();
        result.map_err(|f| anyhow!("CNI DEL of bench pod {} failed: {f}", pod.ident.name))?;
        pod.added = false;
        timings.del_ms.push(elapsed.as_secs_f64() * 1e3);
    }
    Ok(timings)
}
