//! Benchmark (ignored by default; run with
//! `cargo test --release -p ferrum-e2e --test observe_bench -- --ignored --nocapture`):
//! pod-to-pod TCP throughput (iperf3) across nodes and on one node with flow events off,
//! sampled (the default) and on every packet, interleaved in the same run on the same lab.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferrum_datapath::bpf::{Datapath, FlowEvents};
use ferrum_datapath::netns::command_in_netns;
use ferrum_e2e::{Lab, pod_yaml};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf_server(netns: &Path) -> Result<Server> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command_in_netns(&mut cmd, netns)?;
    let child = cmd
        .spawn()
        .context("starting iperf3 -s (Debian package iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Server(child))
}

/// Gbit/s received by the server in a `secs`-second run.
fn iperf(netns: &Path, server: std::net::Ipv4Addr, secs: u32) -> Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &server.to_string(),
        "-p",
        "5201",
        "-J",
        "-t",
        &secs.to_string(),
    ]);
    command_in_netns(&mut cmd, netns)?;
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "iperf3 -c failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    Ok(bps / 1e9)
}

fn set_mode(lab: &Lab, mode: FlowEvents) -> Result<()> {
    for node in ["node-0", "node-1"] {
        Datapath::open(&lab.paths.node_bpf_dir(node))?.set_flow_events(mode)?;
    }
    Ok(())
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture (root)"]
fn throughput_with_observability_off_sampled_and_every_packet() -> Result<()> {
    let lab = Lab::up(2, &[])?;
    lab.apply(
        &[
            pod_yaml("default", "a", "node-0"),
            pod_yaml("default", "b", "node-1"),
            pod_yaml("default", "c", "node-0"),
        ]
        .join("---\n"),
    )?;
    let a = lab.pod_netns("default", "a")?;
    let b_ip = lab.pod_ip("default", "b")?;
    let c_ip = lab.pod_ip("default", "c")?;
    let _b = iperf_server(&lab.pod_netns("default", "b")?)?;
    let _c = iperf_server(&lab.pod_netns("default", "c")?)?;
    let modes = [
        ("off", FlowEvents::Off),
        ("sampled", FlowEvents::Sampled),
        ("every-packet", FlowEvents::EveryPacket),
    ];
    // More rounds narrow the medians on a noisy machine (FERRUM_BENCH_ROUNDS, default 3).
    let rounds: usize = std::env::var("FERRUM_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    for (path, server) in [("cross-node", b_ip), ("same-node", c_ip)] {
        let mut results = vec![Vec::new(); modes.len()];
        for _round in 0..rounds {
            for (i, (_, mode)) in modes.iter().enumerate() {
                set_mode(&lab, *mode)?;
                results[i].push(iperf(&a, server, 3)?);
            }
        }
        let median = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = median(&results[0]);
        for (i, (name, _)) in modes.iter().enumerate() {
            let m = median(&results[i]);
            println!(
                "{path:<10} {name:<12} median {m:6.2} Gbit/s  ({:+.1}% vs off)  runs {:?}",
                (m / base - 1.0) * 100.0,
                results[i]
                    .iter()
                    .map(|x| (x * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
        }
    }
    set_mode(&lab, FlowEvents::Sampled)?;
    Ok(())
}
