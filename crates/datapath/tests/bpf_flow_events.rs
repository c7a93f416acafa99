//! BPF_PROG_TEST_RUN tests of flow (trace) events: sampling keeps them cheap, drops are always
//! reported, a full ring counts what it lost. Root only; each test has its own netns and pins.

mod bpf_support;

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::Result;
use bpf_support::node::{
    self, Fixture, HOST_MAC_A, MAC_A, NODE_IP, POD_A, POD_B, REMOTE_NODE, REMOTE_POD, sa,
};
use ferrum_datapath::bpf::packet::{self};
use ferrum_datapath::bpf::{Event, EventKind, FlowEvents, Program, Reason};

fn fixture() -> Result<Fixture> {
    node::fixture("fe-bpfe", node::NAT_PORTS)
}

/// A TCP frame from pod A with the given flags byte (the programs do not check checksums).
fn tcp_with_flags(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut frame = packet::tcp_frame(MAC_A, HOST_MAC_A, src, dst, b"data");
    frame[14 + 20 + 13] = flags;
    frame
}

impl Fixture {
    fn run(&mut self, prog: Program, frame: &[u8]) -> Result<()> {
        let ifindex = if prog == Program::FromPod {
            self.veth_a
        } else {
            self.veth_b
        };
        self.dp.test_run(prog, frame, ifindex, 1)?;
        Ok(())
    }

    /// Every event available now.
    fn drain(&mut self) -> Vec<Event> {
        let mut all = Vec::new();
        loop {
            let batch = self
                .events
                .poll(Duration::from_millis(50))
                .expect("poll events");
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }
}

#[test]
fn tcp_connection_starts_and_ends_are_reported_not_every_segment() -> Result<()> {
    let mut f = fixture()?;
    let (a, b) = (sa(POD_A, 40000), sa(POD_B, 80));
    f.run(Program::FromPod, &tcp_with_flags(a, b, 0x02))?;
    let events = f.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].kind, events[0].reason),
        (EventKind::Trace, Reason::ToEndpoint)
    );
    assert_eq!(events[0].tcp_flags, 0x02);
    assert!(!events[0].is_reply);
    for _ in 0..5 {
        f.run(Program::FromPod, &tcp_with_flags(a, b, 0x18))?; // PSH|ACK data
    }
    assert!(f.drain().is_empty(), "data segments are not flow events");
    f.run(Program::FromPod, &tcp_with_flags(a, b, 0x11))?; // FIN|ACK
    f.run(Program::FromPod, &tcp_with_flags(a, b, 0x04))?; // RST
    let flags: Vec<u8> = f.drain().iter().map(|e| e.tcp_flags).collect();
    assert_eq!(flags, vec![0x11, 0x04]);
    Ok(())
}

#[test]
fn other_flows_report_once_per_interval_and_point() -> Result<()> {
    let mut f = fixture()?;
    let udp = |sport| {
        packet::udp_frame(
            MAC_A,
            HOST_MAC_A,
            sa(POD_A, sport),
            sa(POD_B, 53),
            b"q",
            true,
        )
    };
    f.run(Program::FromPod, &udp(5000))?;
    f.run(Program::FromPod, &udp(5000))?;
    f.run(Program::FromPod, &udp(5000))?;
    assert_eq!(f.drain().len(), 1, "one event per flow per interval");
    f.run(Program::FromPod, &udp(5001))?;
    let events = f.drain();
    assert_eq!(events.len(), 1, "a new flow reports at once");
    assert_eq!(events[0].src, sa(POD_A, 5001));
    // The same flow at another observation point is reported there too.
    let remote = packet::udp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(POD_A, 5000),
        sa(REMOTE_POD, 53),
        b"q",
        true,
    );
    f.run(Program::FromPod, &remote)?;
    assert_eq!(f.drain()[0].reason, Reason::ToOverlay);
    let echo = packet::icmp_echo_frame(MAC_A, HOST_MAC_A, POD_A, POD_B, true, 9);
    f.run(Program::FromPod, &echo)?;
    assert_eq!(f.drain()[0].icmp_type, 8, "events carry the ICMP type");
    Ok(())
}

#[test]
fn every_packet_and_off_modes() -> Result<()> {
    let mut f = fixture()?;
    let (a, b) = (sa(POD_A, 40000), sa(POD_B, 80));
    f.dp.set_flow_events(FlowEvents::EveryPacket)?;
    for _ in 0..3 {
        f.run(Program::FromPod, &tcp_with_flags(a, b, 0x10))?;
    }
    assert_eq!(f.drain().len(), 3);
    f.dp.set_flow_events(FlowEvents::Off)?;
    f.run(Program::FromPod, &tcp_with_flags(a, b, 0x02))?;
    assert!(f.drain().is_empty());
    // Drops are reported whatever the mode.
    let spoofed = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_B, 1), b, b"");
    f.run(Program::FromPod, &spoofed)?;
    let events = f.drain();
    assert_eq!(
        (events[0].kind, events[0].reason),
        (EventKind::Drop, Reason::SpoofedIp)
    );
    f.dp.set_flow_events(FlowEvents::Sampled)?;
    f.run(Program::FromPod, &tcp_with_flags(a, b, 0x02))?;
    assert_eq!(f.drain().len(), 1);
    Ok(())
}

#[test]
fn pod_traffic_is_not_reported_twice_on_its_way_into_the_overlay() -> Result<()> {
    let mut f = fixture()?;
    let from_pod = tcp_with_flags(sa(POD_A, 40000), sa(REMOTE_POD, 80), 0x02);
    f.run(Program::FromPod, &from_pod)?;
    f.run(Program::ToOverlay, &from_pod)?;
    let events = f.drain();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].ifindex, f.veth_a,
        "reported where the pod sent it"
    );
    // The node's own traffic into the overlay is reported by to_overlay.
    let from_node = packet::tcp_frame(
        MAC_A,
        HOST_MAC_A,
        sa(NODE_IP, 40000),
        sa(REMOTE_POD, 80),
        b"",
    );
    f.run(Program::ToOverlay, &from_node)?;
    let events = f.drain();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].reason, events[0].tunnel_endpoint),
        (Reason::ToOverlay, Some(REMOTE_NODE))
    );
    Ok(())
}

#[test]
fn a_full_ring_counts_every_event_it_loses() -> Result<()> {
    let mut f = fixture()?;
    assert_eq!(f.dp.events_lost()?, 0);
    let spoofed = packet::tcp_frame(MAC_A, HOST_MAC_A, sa(POD_B, 1), sa(POD_A, 2), b"");
    // 40000 drops without reading: more than a 1 MiB ring holds (56 bytes per record).
    let runs = 40_000u32;
    f.dp.test_run(Program::FromPod, &spoofed, f.veth_a, runs)?;
    let lost = f.dp.events_lost()?;
    let read = f.drain().len() as u64;
    assert!(lost > 0, "the ring overflowed");
    assert!(read >= (1 << 20) / 56 - 1, "the ring held {read} events");
    assert_eq!(
        read + lost,
        u64::from(runs),
        "every event is either read or counted lost"
    );
    Ok(())
}
