//! Service load-balancer benchmark (root; creates and removes its own network namespace):
//!
//! - per-packet cost of from_pod for an established flow to a ClusterIP, via
//!   BPF_PROG_TEST_RUN, with 10, 1,000 and 10,000 Services installed, next to the same
//!   program forwarding pod to pod without a Service (the baseline, measured in the same run);
//! - time from an EndpointSlice change to the datapath updated (compile + map reconcile, the
//!   agent's work after the watch event arrives), p50/p99 over 100 changes.
//!
//! Run: `cargo run --release -p ferrum-agent --example lb_bench`

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrum_agent::services::{LbDataplane, LbReconciler, LbState, ServiceTable};
use ferrum_datapath::bpf::packet::{self, Mac};
use ferrum_datapath::bpf::{
    Datapath, EndpointInfo, LbBackend, LbConntrack, LbFrontendKey, LbService, MAGLEV_CHUNK,
    NodeConfig, Program,
};
use ferrum_lb::{Algorithm, Cluster};
use ferrum_model::{Object, WatchEvent};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

struct Dp(Datapath);

impl LbDataplane for Dp {
    fn lb_state(&mut self) -> Result<LbState> {
        Ok(LbState {
            services: self.0.lb_services()?,
            backends: self.0.lb_backends()?,
            maglev: self.0.lb_maglev()?,
            ranges: self.0.lb_ranges()?.into_iter().collect(),
        })
    }
    fn upsert_lb_service(&mut self, k: &LbFrontendKey, s: &LbService) -> Result<()> {
        Ok(self.0.upsert_lb_service(k, s)?)
    }
    fn remove_lb_service(&mut self, k: &LbFrontendKey) -> Result<()> {
        Ok(self.0.remove_lb_service(k)?)
    }
    fn upsert_lb_backend(&mut self, id: u32, slot: u32, b: &LbBackend) -> Result<()> {
        Ok(self.0.upsert_lb_backend(id, slot, b)?)
    }
    fn remove_lb_backend(&mut self, id: u32, slot: u32) -> Result<()> {
        Ok(self.0.remove_lb_backend(id, slot)?)
    }
    fn lb_conntrack(&mut self) -> Result<Vec<LbConntrack>> {
        Ok(self.0.lb_conntrack()?)
    }
    fn remove_lb_conntrack(&mut self, ct: &LbConntrack) -> Result<()> {
        Ok(self.0.remove_lb_conntrack(ct)?)
    }
    fn upsert_lb_maglev(&mut self, id: u32, c: u32, s: &[u16; MAGLEV_CHUNK]) -> Result<()> {
        Ok(self.0.upsert_lb_maglev(id, c, s)?)
    }
    fn remove_lb_maglev(&mut self, id: u32, c: u32) -> Result<()> {
        Ok(self.0.remove_lb_maglev(id, c)?)
    }
    fn upsert_lb_range(&mut self, id: u32, a: Ipv4Addr, l: u8) -> Result<()> {
        Ok(self.0.upsert_lb_range(id, a, l)?)
    }
    fn remove_lb_range(&mut self, id: u32, a: Ipv4Addr, l: u8) -> Result<()> {
        Ok(self.0.remove_lb_range(id, a, l)?)
    }
    fn lb_affinity(&mut self) -> Result<Vec<(u32, Ipv4Addr, LbBackend)>> {
        Ok(self.0.lb_affinity()?)
    }
    fn remove_lb_affinity(&mut self, id: u32, c: Ipv4Addr) -> Result<()> {
        Ok(self.0.remove_lb_affinity(id, c)?)
    }
}

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 6);
const MAC_A: Mac = [0x02, 0xaa, 0, 0, 0, 5];
const HOST_A: Mac = [0x02, 0xee, 0, 0, 0, 5];
const REPEAT: u32 = 200_000;

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

struct Cleanup {
    netns: String,
    pins: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = ferrum_datapath::bpf::remove_pins(&self.pins);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + 1 + i) // 10.0.x.y
}

fn objects(n: u32, ready_flip: Option<u32>) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        services.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("s{i}"), "namespace": "default"},
                "spec": {"clusterIP": vip(i).to_string(), "ports": [{"port": 80}]}
            }))
            .expect("service"),
        );
        let ready_b = ready_flip != Some(i);
        slices.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("s{i}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4",
                "ports": [{"port": 8080}],
                "endpoints": [
                    {"addresses": [POD_B.to_string()], "conditions": {"ready": true}},
                    {"addresses": ["10.1.0.7"], "conditions": {"ready": ready_b}}
                ]
            }))
            .expect("slice"),
        );
    }
    (services, slices)
}

fn compile(services: &[Service], slices: &[EndpointSlice]) -> ferrum_lb::Compiled {
    ferrum_lb::compile(&Cluster {
        services: services.iter().collect(),
        slices: slices.iter().collect(),
        node_name: "node-0".into(),
        node_ip: Some(Ipv4Addr::new(10, 224, 0, 10)),
        node_ips: vec![Ipv4Addr::new(10, 224, 0, 10)],
        default_algorithm: Algorithm::Random,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() -> Result<()> {
    let netns = format!("ferrum-lbbench-{}", std::process::id());
    ip(&["netns", "add", &netns])?;
    let _cleanup = Cleanup {
        netns: netns.clone(),
        pins: PathBuf::from(format!("/sys/fs/bpf/ferrum-lbbench-{}", std::process::id())),
    };
    ip(&[
        "-n", &netns, "link", "add", "va", "type", "veth", "peer", "name", "vb",
    ])?;
    ip(&["-n", &netns, "link", "set", "va", "up"])?;
    ip(&["-n", &netns, "link", "set", "vb", "up"])?;
    let file = std::fs::File::open(format!("/run/netns/{netns}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    let mut dp = Datapath::open(&_cleanup.pins)?;
    let (va, vb) = (
        nix::net::if_::if_nametoindex("va")?,
        nix::net::if_::if_nametoindex("vb")?,
    );
    dp.set_config(&NodeConfig {
        node_ip: Ipv4Addr::new(10, 224, 0, 10),
        cluster_cidr: "10.1.0.0/16".parse()?,
        local_block: "10.1.0.0/24".parse()?,
        overlay_ifindex: vb,
        uplink_ifindex: vb,
        vni: 2,
        nat_ports: 49152..=65535,
        trace: false,
    })?;
    for (addr, ifindex, last) in [
        (POD_A, va, 5u8),
        (POD_B, vb, 6),
        (Ipv4Addr::new(10, 1, 0, 7), vb, 7),
    ] {
        dp.upsert_endpoint(
            addr,
            &EndpointInfo {
                ifindex,
                pod_mac: [0x02, 0xaa, 0, 0, 0, last],
                host_mac: [0x02, 0xee, 0, 0, 0, last],
            },
        )?;
    }
    let mut dp = Dp(dp);
    let mut reconciler = LbReconciler::default();
    let baseline_frame = packet::tcp_frame(
        MAC_A,
        HOST_A,
        SocketAddrV4::new(POD_A, 40000),
        SocketAddrV4::new(POD_B, 80),
        b"x",
    );

    println!("services  install_ms  baseline_ns  lb_ns  lb/baseline  slice_change_p50_ms  p99_ms");
    for n in [10u32, 1_000, 10_000] {
        let (services, slices) = objects(n, None);
        let started = Instant::now();
        let compiled = compile(&services, &slices);
        reconciler.reconcile(&mut dp, &compiled)?;
        let install = started.elapsed();

        let target = vip(n / 2);
        let frame = packet::tcp_frame(
            MAC_A,
            HOST_A,
            SocketAddrV4::new(POD_A, 40001),
            SocketAddrV4::new(target, 80),
            b"x",
        );
        // Warm up (creates the flow's conntrack entry), then time: established flow.
        let warm = dp.0.test_run(Program::FromPod, &frame, va, 1)?;
        let p = packet::parse(&warm.frame)?;
        if p.dst == target || warm.retval != ferrum_datapath::bpf::TC_ACT_REDIRECT {
            bail!(
                "the benchmark flow was not balanced: {p:?}, verdict {}",
                warm.retval
            );
        }
        let base =
            dp.0.test_run(Program::FromPod, &baseline_frame, va, REPEAT)?
                .duration;
        let lb =
            dp.0.test_run(Program::FromPod, &frame, va, REPEAT)?
                .duration;
        let base2 =
            dp.0.test_run(Program::FromPod, &baseline_frame, va, REPEAT)?
                .duration;
        let base = base.min(base2);

        // The agent's path: the watch event updates the table, which recompiles only the
        // changed Service, then the maps are reconciled by diff.
        let mut table = ServiceTable::default();
        for svc in services {
            table.apply(&WatchEvent::Upsert {
                object: Object::Service(svc),
            });
        }
        for slice in slices {
            table.apply(&WatchEvent::Upsert {
                object: Object::EndpointSlice(slice),
            });
        }
        let node_ip = Ipv4Addr::new(10, 224, 0, 10);
        let compiled = table.compile("node-0", node_ip, vec![node_ip], Algorithm::Random);
        reconciler.reconcile(&mut dp, &compiled)?;
        let mut times = Vec::new();
        let mut compile_times = Vec::new();
        for k in 0..100u32 {
            let flip = (k * 7919) % n;
            let (_, mut slices) = objects(flip + 1, Some(flip));
            let changed = slices.swap_remove(flip as usize);
            let started = Instant::now();
            table.apply(&WatchEvent::Upsert {
                object: Object::EndpointSlice(changed),
            });
            let compiled = table.compile("node-0", node_ip, vec![node_ip], Algorithm::Random);
            compile_times.push(started.elapsed());
            reconciler.reconcile(&mut dp, &compiled)?;
            times.push(started.elapsed());
        }
        times.sort();
        compile_times.sort();
        eprintln!(
            "  ({n} services: compile alone p50 {:.2} ms)",
            percentile(&compile_times, 0.5).as_secs_f64() * 1e3
        );
        println!(
            "{n:>8}  {:>10.1}  {:>11}  {:>5}  {:>11.2}  {:>19.2}  {:>6.2}",
            install.as_secs_f64() * 1e3,
            base.as_nanos(),
            lb.as_nanos(),
            lb.as_nanos() as f64 / base.as_nanos().max(1) as f64,
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
