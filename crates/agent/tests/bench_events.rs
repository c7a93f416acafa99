//! Benchmark (ignored by default; run with
//! `cargo test --release -p ferrum-agent --test bench_events -- --ignored --nocapture`):
//! how many datapath events per second the agent's event path (ring buffer read, flow record,
//! flow ring, counters) sustains on one core without loss at the 1 MiB ring.
//!
//! A producer thread on the other core runs `from_pod` with BPF_PROG_TEST_RUN on a spoofed
//! frame (every run emits one drop event) in its own network namespace. Phase 1 produces as
//! fast as it can: if the consumer falls behind, events are lost and the consumer's rate is its
//! ceiling. Phase 2 produces at 80% of that ceiling and must lose nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrum_agent::observe::Observer;
use ferrum_datapath::bpf::packet;
use ferrum_datapath::bpf::{Datapath, EventReader, NodeConfig, Program, remove_pins};

fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// A bpffs pin directory removed on drop, also when the benchmark panics.
struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = remove_pins(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

struct Phase {
    produced: u64,
    consumed: u64,
    lost: u64,
    secs: f64,
}

/// Runs the producer at `rate` events/s (None: flat out) for `secs`, consuming on this thread.
fn phase(
    dp: &Arc<std::sync::Mutex<Datapath>>,
    reader: &mut EventReader,
    observer: &Observer,
    rate: Option<f64>,
    secs: f64,
) -> Phase {
    let lost_before = dp.lock().unwrap().events_lost().unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let frame = packet::tcp_frame(
        [2, 0, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        "10.1.0.9:1000".parse().unwrap(),
        "10.1.0.8:80".parse().unwrap(),
        b"",
    );
    let producer = {
        let (dp, produced, done) = (Arc::clone(dp), Arc::clone(&produced), Arc::clone(&done));
        std::thread::spawn(move || {
            pin(1);
            let batch = 256u32;
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                if let Some(rate) = rate {
                    let due = (start.elapsed().as_secs_f64() * rate) as u64;
                    if produced.load(Ordering::Relaxed) >= due {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                }
                // ifindex 1 (lo) is no endpoint's veth: every run is a SPOOFED_IP drop event.
                dp.lock()
                    .unwrap()
                    .test_run(Program::FromPod, &frame, 1, batch)
                    .unwrap();
                produced.fetch_add(u64::from(batch), Ordering::Relaxed);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    pin(0);
    let start = Instant::now();
    let mut consumed = 0u64;
    loop {
        let batch = reader.poll(Duration::from_millis(50)).unwrap();
        if batch.is_empty() && done.load(Ordering::SeqCst) {
            break;
        }
        consumed += batch.len() as u64;
        observer.record(&batch);
    }
    let elapsed = start.elapsed().as_secs_f64();
    producer.join().unwrap();
    let lost = dp.lock().unwrap().events_lost().unwrap() - lost_before;
    Phase {
        produced: produced.load(Ordering::SeqCst),
        consumed,
        lost,
        secs: elapsed,
    }
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture (root)"]
fn events_per_second_on_one_core() {
    let pins = Pins(format!("/sys/fs/bpf/ferrum-bench-{}", std::process::id()).into());
    let pin_dir = pins.0.clone();
    // A private network namespace for this thread (and the threads it starts): nothing is
    // attached anywhere, but the test runs stay out of the root namespace all the same.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a netns");
    let mut dp = Datapath::open(&pin_dir).expect("load the datapath");
    dp.set_config(&NodeConfig {
        node_ip: "10.224.0.10".parse().unwrap(),
        cluster_cidr: "10.1.0.0/16".parse().unwrap(),
        local_block: "10.1.0.0/24".parse().unwrap(),
        overlay_ifindex: 1,
        uplink_ifindex: 1,
        vni: 2,
        nat_ports: 61000..=65535,
        trace: true,
    })
    .unwrap();
    let mut reader = dp.take_events().unwrap();
    let dp = Arc::new(std::sync::Mutex::new(dp));
    let observer = Observer::new("bench", 4096, 0);

    let flat = phase(&dp, &mut reader, &observer, None, 3.0);
    let ceiling = flat.consumed as f64 / flat.secs;
    println!(
        "flat out: produced {:.0}/s, agent consumed {:.0}/s on one core, lost {} of {}",
        flat.produced as f64 / flat.secs,
        ceiling,
        flat.lost,
        flat.produced
    );
    let target = 0.8 * ceiling;
    let steady = phase(&dp, &mut reader, &observer, Some(target), 3.0);
    println!(
        "at 80% ({target:.0}/s): produced {}, consumed {}, lost {} -> sustained {:.0} events/s without loss",
        steady.produced,
        steady.consumed,
        steady.lost,
        steady.consumed as f64 / steady.secs
    );
    drop(dp);
    drop(pins);
    assert_eq!(
        flat.produced,
        flat.consumed + flat.lost,
        "every event read or counted lost"
    );
    assert_eq!(steady.produced, steady.consumed + steady.lost);
}

/// Per-packet cost of `from_pod` forwarding pod-to-pod traffic (kernel-measured ns per run of
/// BPF_PROG_TEST_RUN) with flow events off, sampled and on every packet, interleaved in the
/// same run; an agent-style reader drains the ring meanwhile, as in production.
#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture (root)"]
fn per_packet_cost_of_flow_events() {
    use ferrum_datapath::bpf::{EndpointInfo, FlowEvents};
    let pins = Pins(format!("/sys/fs/bpf/ferrum-bench-pp-{}", std::process::id()).into());
    let pin_dir = pins.0.clone();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare a netns");
    let mut dp = Datapath::open(&pin_dir).expect("load the datapath");
    dp.set_config(&NodeConfig {
        node_ip: "10.224.0.10".parse().unwrap(),
        cluster_cidr: "10.1.0.0/16".parse().unwrap(),
        local_block: "10.1.0.0/24".parse().unwrap(),
        overlay_ifindex: 1,
        uplink_ifindex: 1,
        vni: 2,
        nat_ports: 61000..=65535,
        trace: true,
    })
    .unwrap();
    let (mac_a, mac_b) = ([2, 0xaa, 0, 0, 0, 5], [2, 0xaa, 0, 0, 0, 6]);
    // Both endpoints behind lo (ifindex 1): the test run only needs skb->ifindex to match.
    // Repeated runs see the frame as the previous run left it, so B's host-side MAC is A's MAC:
    // the rewrite toward B keeps the source MAC that A's anti-spoofing check expects.
    dp.upsert_endpoint(
        "10.1.0.5".parse().unwrap(),
        &EndpointInfo {
            ifindex: 1,
            pod_mac: mac_a,
            host_mac: [2, 0xee, 0, 0, 0, 1],
        },
    )
    .unwrap();
    dp.upsert_endpoint(
        "10.1.0.6".parse().unwrap(),
        &EndpointInfo {
            ifindex: 1,
            pod_mac: mac_b,
            host_mac: mac_a,
        },
    )
    .unwrap();
    let mut tcp = packet::tcp_frame(
        mac_a,
        [2, 0xee, 0, 0, 0, 1],
        "10.1.0.5:40000".parse().unwrap(),
        "10.1.0.6:80".parse().unwrap(),
        &[0u8; 1400],
    );
    tcp[14 + 20 + 13] = 0x10; // ACK: a data segment, not a connection start
    let udp = packet::udp_frame(
        mac_a,
        [2, 0xee, 0, 0, 0, 1],
        "10.1.0.5:5000".parse().unwrap(),
        "10.1.0.6:53".parse().unwrap(),
        &[0u8; 1400],
        true,
    );
    let mut reader = dp.take_events().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (done, drained) = (Arc::clone(&done), Arc::clone(&drained));
        std::thread::spawn(move || {
            let observer = Observer::new("bench", 4096, 0);
            while !done.load(Ordering::SeqCst) {
                let batch = reader.poll(Duration::from_millis(20)).unwrap();
                drained.fetch_add(batch.len() as u64, Ordering::Relaxed);
                observer.record(&batch);
            }
        })
    };
    let modes = [
        ("off", FlowEvents::Off),
        ("sampled", FlowEvents::Sampled),
        ("every-packet", FlowEvents::EveryPacket),
    ];
    for (name, frame) in [("TCP data", &tcp), ("UDP", &udp)] {
        let mut ns = vec![Vec::new(); modes.len()];
        for _round in 0..5 {
            for (i, (_, mode)) in modes.iter().enumerate() {
                dp.set_flow_events(*mode).unwrap();
                let out = dp.test_run(Program::FromPod, frame, 1, 20_000).unwrap();
                assert_eq!(
                    out.retval,
                    ferrum_datapath::bpf::TC_ACT_REDIRECT,
                    "{name} forwarded to the peer"
                );
                ns[i].push(out.duration.as_nanos() as f64);
            }
        }
        let median = |v: &Vec<f64>| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let base = median(&ns[0]);
        for (i, (mode, _)) in modes.iter().enumerate() {
            let m = median(&ns[i]);
            println!(
                "{name:<8} {mode:<12} {m:6.0} ns/packet ({:+.1}% vs off)",
                (m / base - 1.0) * 100.0
            );
        }
    }
    done.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    let lost = dp.events_lost().unwrap();
    println!(
        "events drained {}, lost {lost}",
        drained.load(Ordering::Relaxed)
    );
    drop(dp);
    drop(pins);
}
