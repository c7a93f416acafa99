//! IPAM benchmark, both modes in one run (root; builds two one-node labs):
//!
//! 1. allocation throughput of the crash-safe store (every change fsynced) against the pure
//!    in-memory pool as the baseline;
//! 2. CNI ADD latency (p50/p99) of the real plugin against the real agent while filling one node
//!    to 250 pods, overlay vs VNet (VNet includes waiting for batches: an ADD answered with
//!    code 11 is retried, as kubelet does).
//!
//! ```text
//! cargo build --workspace --bins
//! FERRUM_BIN_DIR=$PWD/target/debug cargo run -p ferrum-e2e --example ipam_bench
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrum_e2e::Lab;
use ferrum_ipam::{Pool, Store};
use ferrum_lab::fabric;
use ferrum_lab::runtime::{PodIdent, RuntimeConfig, run_cni};

const PODS: usize = 250;

fn vnet_pool() -> Pool<u32, u32> {
    let mut p = Pool::with_subnet("10.225.0.0/16".parse().unwrap(), 250);
    let set = (1..=256u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 225, 4, 0)) + i))
        .collect();
    p.set_addresses(set).unwrap();
    p
}

fn overlay_pool() -> Pool<u32, u32> {
    Pool::with_block("10.244.3.0/24".parse().unwrap(), 250)
}

/// Allocations per second: fill to 250 and empty again, `rounds` times.
fn throughput(mut step: impl FnMut(u32, bool), rounds: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..rounds {
        for k in 0..PODS as u32 {
            step(k, true);
        }
        for k in 0..PODS as u32 {
            step(k, false);
        }
    }
    f64::from(rounds) * PODS as f64 / start.elapsed().as_secs_f64()
}

fn allocation(mode: &str, make: fn() -> Pool<u32, u32>) -> Result<()> {
    let mut pool = make();
    let mem = throughput(
        |k, add| {
            if add {
                pool.allocate(k, k).unwrap();
            } else {
                pool.release(&k);
            }
        },
        200,
    );
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let mut store: Store<u32, u32> = Store::open(dir.path(), 250)?;
    store.update(|p| {
        *p = make();
        Ok(())
    })?;
    let durable = throughput(
        |k, add| {
            if add {
                store.allocate(k, k).unwrap();
            } else {
                store.release(&k).unwrap();
            }
        },
        2,
    );
    println!(
        "{mode:8} allocation: in-memory pool {mem:>12.0}/s   crash-safe store {durable:>8.0}/s   ({:.0}x the cost of durability)",
        mem / durable
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn cni_add(mode: &str, extra: &[&str]) -> Result<Vec<Duration>> {
    let mut args = vec!["--max-pods", "250"];
    args.extend_from_slice(extra);
    let lab = Lab::up(1, &args)?;
    let status = lab.status()?;
    let host_ip: Ipv4Addr = status["nodes"][0]["ip"]
        .as_str()
        .context("node ip")?
        .parse()?;
    let cfg = RuntimeConfig {
        paths: lab.paths.clone(),
        node: "node-0".into(),
        host_ip,
        bin_dir: ferrum_e2e::bin_dir(),
        max_pods: 250,
    };
    let mut took = Vec::with_capacity(PODS);
    let mut pods = Vec::new();
    for i in 0..PODS {
        let ident = PodIdent {
            namespace: "bench".into(),
            name: format!("p{i}"),
            uid: format!("{i:08x}-be9c-4000-8000-000000000000"),
        };
        let netns = lab.paths.pod_netns(&ident.uid);
        fabric::add_netns(&netns)?;
        let start = Instant::now();
        loop {
            match run_cni(&cfg, "ADD", &ident, &netns) {
                Ok(_) => break,
                Err(e) if e.code == Some(11) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => anyhow::bail!("{mode}: ADD of pod {i}: {e}"),
            }
        }
        took.push(start.elapsed());
        pods.push((ident, netns));
    }
    for (ident, netns) in &pods {
        let _ = run_cni(&cfg, "DEL", ident, netns);
        let _ = fabric::delete_netns(netns);
    }
    Ok(took)
}

fn main() -> Result<()> {
    allocation("overlay", overlay_pool)?;
    allocation("vnet", vnet_pool)?;
    let overlay = cni_add("overlay", &[])?;
    let vnet = cni_add(
        "vnet",
        &[
            "--network-plugin-mode",
            "vnet",
            "--pod-subnet",
            "10.225.0.0/16",
        ],
    )?;
    let mut rows = Vec::new();
    for (mode, mut t) in [("overlay", overlay), ("vnet", vnet)] {
        t.sort();
        let (p50, p99) = (percentile(&t, 0.5), percentile(&t, 0.99));
        println!(
            "{mode:8} CNI ADD filling a node to {PODS} pods: p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            t[t.len() - 1].as_secs_f64() * 1e3
        );
        rows.push((p50, p99));
    }
    println!(
        "vnet/overlay: p50 {:.2}x  p99 {:.2}x",
        rows[1].0.as_secs_f64() / rows[0].0.as_secs_f64(),
        rows[1].1.as_secs_f64() / rows[0].1.as_secs_f64()
    );
    Ok(())
}
